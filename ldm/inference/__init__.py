"""Inference API behind scripts/txt2img.py and scripts/img2img.py."""

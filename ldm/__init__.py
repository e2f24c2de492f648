"""Latent diffusion (Stable Diffusion style) text-to-image models, samplers and tools."""

__version__ = "0.1.0"

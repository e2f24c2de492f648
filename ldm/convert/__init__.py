"""Conversions between this project's checkpoint layout and other layouts (diffusers folders)."""

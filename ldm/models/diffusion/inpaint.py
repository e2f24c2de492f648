"""Inpainting models (``LatentInpaintDiffusion``: a UNet fed [noisy latent, mask, masked-image latent]) and the
conditioning they take, prepared as the original SD 2 inpainting code prepares it.

The mask is 1 where the picture is repainted. The original binarises it at 0.5, blanks the repainted part of the
image (``image * (mask < 0.5)``), encodes that through the first stage (a posterior SAMPLE, scaled), resizes the
mask to the latent size (nearest) and concatenates ``[mask, masked-image latent]`` as ``c_concat``; the
unconditional branch of guidance gets the same ``c_concat``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """Mask [B, 1, H, W] in [0, 1] -> {0, 1} (1 = repaint) at the threshold 0.5, as the original."""
    return (mask >= 0.5).to(mask.dtype)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image [B, 3, H, W] in [-1, 1] with the repainted part (binary mask [B, 1, H, W] = 1) set to 0."""
    return image * (mask < 0.5).to(image.dtype)


def latent_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Binary mask [B, 1, H, W] resized to the latent size (h, w) as the original does (nearest)."""
    return F.interpolate(mask, size=tuple(size))


def concat_conditioning(mask: torch.Tensor, masked_latent: torch.Tensor) -> torch.Tensor:
    """``c_concat`` [B, 1 + C, h, w] = [mask resized to h x w, masked-image latent [B, C, h, w]], in that order."""
    return torch.cat([latent_mask(mask, masked_latent.shape[-2:]).to(masked_latent), masked_latent], dim=1)


def is_inpainting_model(model: Any) -> bool:
    """True for models whose UNet takes the mask and the masked-image latent (``c_concat``) besides x."""
    wrapper = getattr(model, "model", None)
    return getattr(wrapper, "conditioning_key", None) in ("hybrid", "concat", "hybrid-adm") and bool(
        getattr(model, "concat_keys", ()))

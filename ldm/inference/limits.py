"""Limits of a generation run, checked before anything heavy starts: image sides and area, number of images, a
memory estimate of the largest batch against the memory the device has free, and finite results.

The estimate is deliberately simple (activations kept by the UNet and the autoencoder decoder, plus the
checkpoint's size); it only has to tell a run that can fit from one that cannot by a wide margin. Every limit but
the finite-result check can be skipped with ``--allow_large``.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ldm.inference.errors import UsageError

logger = logging.getLogger(__name__)

MAX_SIDE = 16384  # pixels per side of a generated image
MAX_PIXELS = 4096 * 4096  # pixels of a generated image (16 megapixels)
MAX_IMAGES = 10_000  # images in one run
MAX_READ_PIXELS = 2 * 89_478_485  # pixels of an input image read at all (Pillow's own decompression-bomb limit)
OVERRIDE = "--allow_large"
GIB = 1024 ** 3


class NonFiniteResult(RuntimeError):
    """Sampling or decoding produced NaN/inf values: nothing is saved for that batch."""


def check_finite(x: torch.Tensor, what: str, reduced: bool) -> None:
    """Raise NonFiniteResult (with a hint) unless every value of ``x`` is finite."""
    if bool(torch.isfinite(x).all()):
        return
    hint = ("run in float32 (--precision full, without --bf16/--fast)" if reduced else
            "lower --scale or --ddim_eta, or check the checkpoint (a damaged or badly converted file)")
    raise NonFiniteResult(f"{what} contain NaN/inf values, so no picture was saved for them: {hint}")


def check_size(width: int, height: int, allow_large: bool, what: str = "the image") -> None:
    """UsageError when ``width x height`` exceeds MAX_SIDE per side or MAX_PIXELS in area (unless allowed)."""
    if allow_large:
        return
    if max(width, height) > MAX_SIDE:
        raise UsageError(f"{what} would be {width}x{height} pixels; each side may be at most {MAX_SIDE}: use "
                         f"smaller --W/--H (or pass {OVERRIDE} to try anyway)")
    if width * height > MAX_PIXELS:
        raise UsageError(f"{what} would be {width}x{height} pixels ({width * height / 1e6:.1f} megapixels, the "
                         f"limit is {MAX_PIXELS / 1e6:.1f}): use smaller --W/--H (or pass {OVERRIDE} to try anyway)")


def check_count(n_images: int, allow_large: bool) -> None:
    """UsageError when a run would make more than MAX_IMAGES images (unless allowed)."""
    if n_images > MAX_IMAGES and not allow_large:
        raise UsageError(f"this run would make {n_images} images, more than {MAX_IMAGES}: lower --n_samples/"
                         f"--n_iter/--repeat, split the run (continue with --seed), or pass {OVERRIDE}")


def _params(config: Any, *keys: str) -> Mapping[str, Any]:
    node: Any = config
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
    return node if isinstance(node, Mapping) else {}


def unet_values(config: Any, latent_h: int, latent_w: int) -> int:
    """Activation values one UNet pass keeps per sample: its skip connections plus working room at each level."""
    unet = (_params(config, "model", "params", "unet_config", "params")
            or _params(config, "model", "params", "network_config", "params"))  # SDXL (sgm) configs
    mc, mults = int(unet.get("model_channels", 0)), list(unet.get("channel_mult", ()))
    nres = unet.get("num_res_blocks", 2)
    nres = list(nres) if not isinstance(nres, int) else [nres] * len(mults)
    skips, widest = 0, 0
    for level, mult in enumerate(mults):
        cells = latent_h * latent_w // 4 ** level
        skips += (nres[level] + 1) * mc * mult * cells
        widest = max(widest, mc * mult * cells)
    return skips + 12 * widest  # transformer feed-forward (GEGLU: 8x), res-block and attention temporaries


def decoder_values(config: Any, height: int, width: int) -> int:
    """Activation values the autoencoder decoder needs per image at its widest point (about five tensors)."""
    dd = _params(config, "model", "params", "first_stage_config", "params", "ddconfig")
    ch, mults = int(dd.get("ch", 0)), list(dd.get("ch_mult", ()))
    widest = max((ch * mult * height * width // 4 ** max(level - 1, 0) for level, mult in enumerate(mults)),
                 default=0)
    return 5 * widest


def estimate_bytes(config: Any, factor: int, width: int, height: int, batch: int, guided: bool,
                   bytes_per_value: int = 4, tile: Optional[int] = None, weights_bytes: int = 0) -> int:
    """Rough peak memory of one batch: the weights plus the larger of the UNet and the decoder activations."""
    unet = unet_values(config, height // factor, width // factor) * batch * (2 if guided else 1)
    dec_h, dec_w = (min(height, tile * factor), min(width, tile * factor)) if tile else (height, width)
    decoder = decoder_values(config, dec_h, dec_w) * batch
    return weights_bytes + max(unet, decoder) * bytes_per_value


def available_bytes(device: str) -> Optional[int]:
    """Free memory of ``device`` (CUDA: free GPU memory; otherwise the system's available RAM), None if unknown."""
    dev = torch.device(device)
    if dev.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(dev.index if dev.index is not None else torch.cuda.current_device())[0])
        except (RuntimeError, AssertionError):
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(needed: int, device: str, allow_large: bool, what: str) -> None:
    """UsageError when ``needed`` bytes clearly exceed what ``device`` has free (unless allowed)."""
    free = available_bytes(device)
    logger.debug("memory estimate %.2f GiB, free on %s: %s", needed / GIB, device,
                 "unknown" if free is None else f"{free / GIB:.2f} GiB")
    if allow_large or free is None or needed <= free:
        return
    raise UsageError(f"{what} needs about {needed / GIB:.1f} GiB, but {device} has {free / GIB:.1f} GiB free: "
                     f"lower --n_samples or --W/--H, add --tiled_vae, or pass {OVERRIDE} to try anyway")


def file_bytes(path: Optional[Path]) -> int:
    """Size of a file in bytes (0 when absent)."""
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0

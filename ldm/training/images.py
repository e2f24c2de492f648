"""Image grids written during training (inputs, reconstructions, samples) under ``<logdir>/images/<split>``."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

logger = logging.getLogger(__name__)


def to_grid(images: torch.Tensor, nrow: int) -> "Image.Image":  # noqa: F821 - PIL imported lazily
    """[N, 3, H, W] in [-1, 1] -> one PIL image with ``nrow`` images per row."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(images.detach().float().cpu().clamp(-1, 1), nrow=nrow, padding=2)
    arr = ((grid + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


def save_grids(rows: Mapping[str, torch.Tensor], folder: Path, step: int,
               captions: Sequence[str] | None = None) -> list[Path]:
    """One PNG per entry (``inputs``, ``samples``, ...) named ``<name>_step-<step>.png``; captions beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, images in rows.items():
        path = folder / f"{name}_step-{step:08d}.png"
        to_grid(images, nrow=max(1, min(8, images.shape[0]))).save(path)
        paths.append(path)
    if captions:
        (folder / f"captions_step-{step:08d}.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")
    logger.debug("image grids for step %d written to %s", step, folder)
    return paths

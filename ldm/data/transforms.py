"""Image transforms for training: resize, crop, flip; deterministic given a per-sample seed."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

_INTERPOLATIONS = {
    "bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "lanczos": Image.LANCZOS,
    "nearest": Image.NEAREST, "area": Image.BOX, "box": Image.BOX,
}


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor [H, W, 3] in [-1, 1] (the NHWC convention of the original batches)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).float().div_(127.5).sub_(1.0)


@dataclass
class ImageTransform:
    """Resize the shorter side to ``size``, crop ``size`` x ``size`` (random or centred), flip with ``flip_p``.

    ``size`` may be an int or ``[height, width]``; ``crop: false`` resizes straight to that size instead.
    ``min_size``: images whose shorter side is smaller are rejected (raise ``ValueError``, counted as skipped).
    """

    size: Any = 256
    random_crop: bool = False
    flip_p: float = 0.0
    interpolation: str = "bicubic"
    crop: bool = True
    min_size: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.size, int):
            self.height = self.width = int(self.size)
        else:
            self.height, self.width = (int(s) for s in self.size)
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{self.interpolation}'; choose one of {sorted(_INTERPOLATIONS)}")

    def __call__(self, image: Image.Image, seed: int | None = None) -> torch.Tensor:
        """PIL image -> [H, W, 3] float tensor in [-1, 1]; randomness drawn from ``seed`` only."""
        rng = random.Random(seed)
        image = image.convert("RGB")
        w, h = image.size
        if min(w, h) < self.min_size:
            raise ValueError(f"image of {w}x{h} pixels is smaller than min_size={self.min_size}")
        resample = _INTERPOLATIONS[self.interpolation]
        if not self.crop:
            image = image.resize((self.width, self.height), resample=resample)
        else:
            scale = max(self.height / h, self.width / w)
            new_w, new_h = max(self.width, round(w * scale)), max(self.height, round(h * scale))
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), resample=resample)
            if self.random_crop:
                left, top = rng.randint(0, new_w - self.width), rng.randint(0, new_h - self.height)
            else:
                left, top = (new_w - self.width) // 2, (new_h - self.height) // 2
            image = image.crop((left, top, left + self.width, top + self.height))
        if self.flip_p > 0 and rng.random() < self.flip_p:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        return pil_to_tensor(image)

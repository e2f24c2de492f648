"""Class-labelled synthetic shapes for pixel-space diffusion: small pictures of the synthetic shapes data set.

Item ``i`` is ``{image_key: [size, size, 3] in [-1, 1] (8-bit levels), "class_label": int, "human_label": str}``
rendered by :mod:`ldm.data.synthetic_shapes` (deterministic from ``seed`` and ``i``). The label is the shape
(``label_by="shape"``, 4 classes) or the shape and its colour (``"shape_colour"``, 32 classes).
"""
from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset

from ldm.data.synthetic_shapes import COLOURS, SHAPES, ShapeScene, image_to_tensor, make_scene, render_scene

LABELINGS = ("shape", "shape_colour")


def class_names(label_by: str = "shape") -> list[str]:
    """The class names, index = class label."""
    if label_by == "shape":
        return list(SHAPES)
    if label_by == "shape_colour":
        return [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]
    raise ValueError(f"unknown label_by '{label_by}'; choose one of {LABELINGS}")


class PixelShapes(Dataset):
    """Map-style data set of ``length`` labelled shape pictures of ``size`` x ``size`` pixels.

    Indexing accepts ``i`` or ``(i, seed)`` (the trainer's sampler form; the picture depends on ``i`` only).
    """

    def __init__(self, size: int = 32, length: int = 10_000, seed: int = 0, label_by: str = "shape",
                 image_key: str = "image", offset: int = 0) -> None:
        if length < 1 or size < 8:
            raise ValueError(f"PixelShapes needs length >= 1 and size >= 8, got length={length}, size={size}")
        self.names = class_names(label_by)
        self.size, self.length, self.seed, self.offset = int(size), int(length), int(seed), int(offset)
        self.label_by, self.image_key = label_by, image_key

    @property
    def num_classes(self) -> int:
        """Number of classes (without a null class for guidance)."""
        return len(self.names)

    def __len__(self) -> int:
        return self.length

    def label_of(self, index: int) -> int:
        """Class label of item ``index`` (no rendering)."""
        return self._label(make_scene(self.seed, self.offset + index))

    def _label(self, scene: ShapeScene) -> int:
        return self.names.index(scene.shape if self.label_by == "shape" else f"{scene.colour} {scene.shape}")

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index = item[0] if isinstance(item, tuple) else item
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        scene = make_scene(self.seed, self.offset + index)
        label = self._label(scene)
        return {self.image_key: image_to_tensor(render_scene(scene, self.size)), "class_label": label,
                "human_label": self.names[label], "__key__": f"{self.offset + index:07d}"}

"""Synthetic captioned shapes: one coloured circle, square, triangle or star on a plain background.

Every picture is a pure function of ``(seed, index)``: the colour/shape/background combination cycles through
all 224 combinations (in an order fixed by the seed), and size, position, rotation and caption wording come
from a numpy ``Generator`` seeded with ``[seed, index]``. A data set of any size is therefore reproducible,
and its first ``n`` items do not depend on how many more are made.

Captions always name the three attributes, ``"a {colour} {shape} on a {colour} background"``; some also name
the size (``small``/``large``) and the position (``at the top left``, ``in the centre``, ...).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

# Palette: saturated, well separated colours (the evaluation classifies pixels by the nearest of these).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 35),
    "green": (30, 160, 60),
    "blue": (35, 75, 225),
    "yellow": (245, 220, 40),
    "purple": (135, 50, 175),
    "orange": (245, 135, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
# Circumradius multipliers that give the four shapes similar visual weight at the same nominal size.
_SHAPE_SCALE = {"circle": 0.85, "square": 0.95, "triangle": 1.1, "star": 1.15}
STAR_INNER_RATIO = 0.45
RADIUS_RANGE = (0.17, 0.33)  # nominal radius as a fraction of the image side
MARGIN = 0.03
PLAIN_CAPTION_P = 0.5


def combinations() -> list[tuple[str, str, str]]:
    """All (colour, shape, background) triples with colour != background, in a fixed order (224 of them)."""
    return [(c, s, b) for c in COLOURS for s in SHAPES for b in COLOURS if b != c]


def plain_caption(colour: str, shape: str, background: str) -> str:
    """The canonical prompt ``"a {colour} {shape} on a {background} background"``."""
    return f"a {colour} {shape} on a {background} background"


@dataclass(frozen=True)
class ShapeScene:
    """One picture's content; centre and radius are fractions of the image side, rotation in degrees."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    radius: float
    rotation: float
    size_word: bool = False
    position_word: bool = False
    an_article: bool = False  # write "an orange ..." instead of the template's "a orange ..."

    @property
    def extent(self) -> float:
        """Circumradius of the drawn shape (fraction of the side)."""
        return self.radius * _SHAPE_SCALE[self.shape]

    def size_name(self) -> str:
        """'small', 'large' or '' (medium sizes get no word)."""
        lo, hi = RADIUS_RANGE
        third = (hi - lo) / 3
        if self.radius < lo + third:
            return "small"
        if self.radius > hi - third:
            return "large"
        return ""

    def position_name(self) -> str:
        """'top left', 'right', 'centre', ... from the centre position (thirds of the image)."""
        vertical = "top" if self.cy < 0.4 else "bottom" if self.cy > 0.6 else ""
        horizontal = "left" if self.cx < 0.4 else "right" if self.cx > 0.6 else ""
        return " ".join(w for w in (vertical, horizontal) if w) or "centre"

    @property
    def caption(self) -> str:
        """The caption: the plain prompt, optionally with size and position words."""
        size = self.size_name() if self.size_word else ""
        subject = " ".join(w for w in (size, self.colour, self.shape) if w)
        subject = f"{self._article(subject)} {subject}"
        if self.position_word:
            where = self.position_name()
            subject += " in the centre" if where == "centre" else f" at the {where}"
        return f"{subject} on {self._article(self.background)} {self.background} background"

    def _article(self, phrase: str) -> str:
        return "an" if self.an_article and phrase[0] in "aeiou" else "a"

    @property
    def plain_caption(self) -> str:
        """The caption without size and position words."""
        return plain_caption(self.colour, self.shape, self.background)


def parse_emphasis(text: str | None) -> dict[str, float]:
    """``"triangle=3,red=2"`` -> ``{"triangle": 3.0, "red": 2.0}``: sampling weights of shapes / foreground
    colours (see ``combination_of``); None or "" -> {}."""
    weights: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in (text or "").split(","))):
        name, _, value = part.partition("=")
        if name not in SHAPES and name not in COLOURS or not value:
            raise ValueError(f"emphasis '{part}': expected NAME=WEIGHT with NAME a shape {SHAPES} or a colour "
                             f"{tuple(COLOURS)}")
        weights[name] = float(value)
        if weights[name] <= 0:
            raise ValueError(f"emphasis '{part}': the weight must be positive")
    return weights


def combination_of(seed: int, index: int, emphasis: dict[str, float] | None = None) -> tuple[str, str, str]:
    """The (colour, shape, background) of item ``index``: each block of 224 items holds every combination once.

    With ``emphasis`` (weights of shapes and foreground colours, default 1) the combinations are drawn
    independently instead, each with probability proportional to its shape's weight x its colour's weight."""
    combos = combinations()
    if emphasis:
        weights = np.asarray([emphasis.get(c, 1.0) * emphasis.get(s, 1.0) for c, s, _ in combos])
        pick = np.random.default_rng([int(seed), 0xE3F, int(index)]).choice(len(combos), p=weights / weights.sum())
        return combos[int(pick)]
    block, offset = divmod(int(index), len(combos))
    order = np.random.default_rng([int(seed), 0x5EED, block]).permutation(len(combos))
    return combos[int(order[offset])]


def make_scene(seed: int, index: int, combination: tuple[str, str, str] | None = None,
               emphasis: dict[str, float] | None = None) -> ShapeScene:
    """The scene of item ``index`` of the data set with this ``seed`` (``combination`` overrides the cycle,
    ``emphasis`` weights it: see ``combination_of``)."""
    colour, shape, background = combination or combination_of(seed, index, emphasis)
    if colour == background or colour not in COLOURS or background not in COLOURS or shape not in SHAPES:
        raise ValueError(f"invalid combination {(colour, shape, background)}: colours from {list(COLOURS)}, "
                         f"shapes from {SHAPES}, foreground != background")
    rng = np.random.default_rng([int(seed), int(index)])
    radius = float(rng.uniform(*RADIUS_RANGE))
    extent = radius * _SHAPE_SCALE[shape]
    lo, hi = extent + MARGIN, 1.0 - extent - MARGIN
    cx, cy = (float(v) for v in rng.uniform(lo, hi, size=2))
    rotation = float(rng.uniform(0.0, 360.0))
    plain = rng.random() < PLAIN_CAPTION_P
    size_word, position_word = (False, False) if plain else (bool(rng.random() < 0.6), bool(rng.random() < 0.6))
    an_article = bool(rng.random() < 0.5)
    return ShapeScene(colour, shape, background, cx, cy, radius, rotation, size_word, position_word, an_article)


def shape_outline(scene: ShapeScene, side: float) -> list[tuple[float, float]]:
    """Polygon vertices in pixels for an image of ``side`` pixels (circles: a 96-gon)."""
    cx, cy, r = scene.cx * side, scene.cy * side, scene.extent * side
    start = math.radians(scene.rotation)
    if scene.shape == "circle":
        radii, count = [r], 96
    elif scene.shape == "square":
        radii, count = [r], 4
    elif scene.shape == "triangle":
        radii, count = [r], 3
    else:
        radii, count = [r, r * STAR_INNER_RATIO], 10
    points = []
    for k in range(count):
        angle = start + 2 * math.pi * k / count
        rad = radii[k % len(radii)]
        points.append((cx + rad * math.cos(angle), cy + rad * math.sin(angle)))
    return points


def coverage_mask(scene: ShapeScene, size: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage of the shape: float32 [size, size] in [0, 1] (box-filtered supersampling)."""
    big = size * supersample
    mask = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(mask)
    if scene.shape == "circle":
        cx, cy, r = scene.cx * big, scene.cy * big, scene.extent * big
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(shape_outline(scene, big), fill=255)
    small = mask.resize((size, size), resample=Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def render_scene(scene: ShapeScene, size: int = 256, supersample: int = 4) -> Image.Image:
    """The RGB picture of ``scene`` at ``size`` x ``size`` pixels."""
    alpha = coverage_mask(scene, size, supersample)[..., None]
    fg = np.asarray(COLOURS[scene.colour], dtype=np.float32)
    bg = np.asarray(COLOURS[scene.background], dtype=np.float32)
    pixels = bg * (1.0 - alpha) + fg * alpha
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")


def render_item(seed: int, index: int, size: int = 256,
                emphasis: dict[str, float] | None = None) -> tuple[Image.Image, ShapeScene]:
    """Picture and scene of item ``index`` of the data set with this ``seed`` (and ``emphasis``)."""
    scene = make_scene(seed, index, emphasis=emphasis)
    return render_scene(scene, size), scene


def scene_record(file_name: str, scene: ShapeScene) -> dict[str, Any]:
    """One ``metadata.jsonl`` record: file name, caption, plain caption and the scene's attributes."""
    return {"file_name": file_name, "caption": scene.caption, "plain_caption": scene.plain_caption, **asdict(scene)}


def write_items(root: str | Path, seed: int, indices: range, size: int = 256,
                emphasis: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Write items ``indices`` as ``root/NNNNNNN.png``; returns their metadata records (captions go there)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for index in indices:
        image, scene = render_item(seed, index, size, emphasis)
        name = f"{index:07d}.png"
        image.save(root / name, compress_level=1)
        records.append(scene_record(name, scene))
    return records


def write_metadata(root: str | Path, records: list[dict[str, Any]]) -> Path:
    """Write ``root/metadata.jsonl`` (the Hugging Face imagefolder layout that ImageCaptionFolder reads)."""
    path = Path(root) / "metadata.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for record in sorted(records, key=lambda r: r["file_name"]):
            f.write(json.dumps(record) + "\n")
    return path


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [H, W, 3] in [-1, 1] (the batch layout of the training data sets)."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)


class SyntheticShapes(Dataset):
    """Map-style data set rendered on the fly: item ``i`` is ``{image_key: [H, W, 3] in [-1, 1], caption_key: str}``.

    Indexing accepts ``i`` or ``(i, seed)`` (the trainer's sampler form). ``crop``: return a random
    ``crop`` x ``crop`` window of the ``size`` picture (for convolutional autoencoders), placed by the
    per-sample seed (or by the index when none is given). ``emphasis`` (``"triangle=3,red=2"`` or a dict) draws
    the combinations with those weights instead of cycling through them (``combination_of``).
    """

    def __init__(self, size: int = 256, length: int = 10_000, seed: int = 0, image_key: str = "jpg",
                 caption_key: str = "txt", offset: int = 0, crop: int | None = None,
                 emphasis: str | dict[str, float] | None = None) -> None:
        if length < 1 or size < 8:
            raise ValueError(f"SyntheticShapes needs length >= 1 and size >= 8, got length={length}, size={size}")
        if crop is not None and not 0 < crop <= size:
            raise ValueError(f"crop must lie in [1, size={size}], got {crop}")
        self.size, self.length, self.seed, self.offset = int(size), int(length), int(seed), int(offset)
        self.image_key, self.caption_key, self.crop = image_key, caption_key, crop
        self.emphasis = parse_emphasis(emphasis) if isinstance(emphasis, str) else dict(emphasis or {})

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, sample_seed = item if isinstance(item, tuple) else (item, item)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} items")
        image, scene = render_item(self.seed, self.offset + index, self.size, self.emphasis)
        if self.crop is not None and self.crop < self.size:
            rng = np.random.default_rng([self.seed, self.offset + index, int(sample_seed) % 2 ** 63])
            left, top = (int(v) for v in rng.integers(0, self.size - self.crop + 1, size=2))
            image = image.crop((left, top, left + self.crop, top + self.crop))
        return {self.image_key: image_to_tensor(image), self.caption_key: scene.caption,
                "__key__": f"{self.offset + index:07d}"}

    def scenes(self) -> Iterator[ShapeScene]:
        """The scenes of all items, in order (no rendering)."""
        for index in range(self.length):
            yield make_scene(self.seed, self.offset + index, emphasis=self.emphasis)

"""An image folder with captions (sidecar ``.txt`` files or a ``metadata.jsonl``) as a map-style dataset."""
from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ldm.data.common import IMAGE_EXTENSIONS, SKIPPABLE_ERRORS, SkipLog, caption_from_json, decode_image
from ldm.data.transforms import ImageTransform

logger = logging.getLogger(__name__)
SPLITS = ("train", "validation", "all")


def in_validation(name: str, fraction: float, seed: int = 0) -> bool:
    """Stable split: a file is in the validation part by a hash of its relative path (adding files moves none)."""
    return zlib.crc32(f"{seed}:{name}".encode()) % 100_000 < fraction * 100_000


def read_metadata(root: Path) -> dict[str, str]:
    """``file_name -> caption`` from ``root/metadata.jsonl`` (Hugging Face imagefolder layout), if present."""
    path = root / "metadata.jsonl"
    if not path.exists():
        return {}
    captions = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            captions[str(record["file_name"])] = caption_from_json(record)
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            logger.warning("%s line %d ignored: %s", path, n, e)
    return captions


class ImageCaptionFolder(Dataset):
    """Images under ``root`` (recursively) with captions; items are dicts ``{image_key: [H,W,3], caption_key: str}``.

    Indexing accepts ``i`` or ``(i, seed)`` (the training sampler passes a per-sample seed so that random crops
    and flips are reproducible whatever the worker layout). An unreadable image is skipped: the next file is used
    and the skip is counted in the item's ``__skipped__`` field.
    """

    def __init__(self, root: str, size: Any = 256, image_key: str = "jpg", caption_key: str = "txt",
                 random_crop: bool = False, flip_p: float = 0.0, interpolation: str = "bicubic",
                 split: str = "all", validation_fraction: float = 0.0, split_seed: int = 0,
                 default_caption: str = "", crop: bool = True, min_size: int = 0, max_retries: int = 16) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder '{self.root}' does not exist; set data.params.<split>.params.root")
        self.image_key, self.caption_key = image_key, caption_key
        self.default_caption = default_caption
        self.max_retries = max_retries
        self.transform = ImageTransform(size=size, random_crop=random_crop, flip_p=flip_p,
                                        interpolation=interpolation, crop=crop, min_size=min_size)
        self.captions = read_metadata(self.root)
        files = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*")
                       if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if split != "all":
            want_val = split == "validation"
            files = [f for f in files if in_validation(f, validation_fraction, split_seed) == want_val]
        if not files:
            raise ValueError(f"no images for split '{split}' under '{self.root}' (extensions {IMAGE_EXTENSIONS}, "
                             f"validation_fraction={validation_fraction})")
        self.files = files
        self.skips = SkipLog(f"ImageCaptionFolder({self.root})")

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, name: str) -> str:
        """Caption of the image ``name`` (relative path): metadata.jsonl, else a sidecar .txt, else the default."""
        if name in self.captions:
            return self.captions[name]
        sidecar = (self.root / name).with_suffix(".txt")
        if sidecar.exists():
            return sidecar.read_text(encoding="utf-8").strip()
        return self.default_caption

    def load(self, index: int, seed: int | None) -> dict[str, Any]:
        """Read and transform one sample; raises a skippable error when the file is unreadable."""
        name = self.files[index]
        image = decode_image((self.root / name).read_bytes())
        return {self.image_key: self.transform(image, seed), self.caption_key: self.caption(name), "__key__": name}

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, index_seed(item))
        for attempt in range(self.max_retries + 1):
            i = (index + attempt) % len(self.files)
            try:
                sample = self.load(i, seed)
            except SKIPPABLE_ERRORS as e:
                self.skips.skipped(self.files[i], e)
                continue
            sample["__skipped__"] = self.skips.take()
            return sample
        raise RuntimeError(f"{self.max_retries + 1} consecutive unreadable images from '{self.files[index]}' on: "
                           f"check the data under '{self.root}'")


def index_seed(index: int) -> int:
    """Fixed augmentation seed for plain integer indexing (validation, ad-hoc use)."""
    return int(index) * 1_000_003 + 12_345

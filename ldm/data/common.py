"""Pieces shared by the datasets: image decoding, the errors that mark a sample as skippable, warning limits."""
from __future__ import annotations

import io
import json
import logging
from typing import Any

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CAPTION_FIELDS = ("caption", "text", "txt", "prompt")
# A sample that raises one of these is skipped and counted instead of stopping training.
SKIPPABLE_ERRORS = (OSError, ValueError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError,
                    KeyError, UnicodeDecodeError, json.JSONDecodeError, EOFError)
_WARN_LIMIT = 20


class SkipLog:
    """Counts skipped samples of one process and warns about the first few (then only at debug level)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.pending = 0

    def skipped(self, key: str, error: BaseException) -> None:
        """Record that sample ``key`` was skipped because of ``error``."""
        self.count += 1
        self.pending += 1
        level = logging.WARNING if self.count <= _WARN_LIMIT else logging.DEBUG
        logger.log(level, "%s: skipping unreadable sample '%s' (%s: %s)%s", self.what, key, type(error).__name__,
                   error, " [further skips are logged at debug level]" if self.count == _WARN_LIMIT else "")


    def take(self) -> int:
        """Skips since the last call (attached to the next good sample so that the trainer can count them)."""
        n, self.pending = self.pending, 0
        return n


def decode_image(data: bytes) -> Image.Image:
    """Decode image bytes fully (so truncated files fail here, not later); raises a skippable error."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def caption_from_json(obj: Any) -> str:
    """Caption stored in a metadata record under one of the usual field names."""
    if isinstance(obj, str):
        return obj
    for name in CAPTION_FIELDS:
        if isinstance(obj, dict) and name in obj:
            return str(obj[name])
    raise KeyError(f"no caption field ({', '.join(CAPTION_FIELDS)}) in metadata record")

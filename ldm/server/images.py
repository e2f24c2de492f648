"""Images in the web UI's JSON: base64 PNG (with the ``parameters`` text chunk) out, base64 or data URLs in."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Optional

from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from ldm.inference import limits
from ldm.inference.errors import UsageError
from ldm.inference.outputs import PARAMETERS_KEY


def encode_png(image: Image.Image, parameters: Optional[str] = None) -> str:
    """``image`` as base64 PNG text (no data-URL prefix), with a ``parameters`` text chunk when given."""
    info = None
    if parameters is not None:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, parameters)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, field: str, max_pixels: int = limits.MAX_READ_PIXELS) -> Image.Image:
    """A base64 image (optionally a ``data:image/...;base64,`` URL) decoded; UsageError naming ``field`` when it
    is not an image or has more than ``max_pixels`` (checked from its header, before decoding the pixels)."""
    text = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
    try:
        raw = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError) as e:
        raise UsageError(f"{field}: not base64 ({e}); send a base64 PNG or JPEG") from None
    try:
        image = Image.open(io.BytesIO(raw))
        if image.width * image.height > max_pixels:
            raise UsageError(f"{field}: the image is {image.width}x{image.height} pixels, more than this server "
                             f"reads ({max_pixels} pixels)")
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UsageError(f"{field}: cannot read the data as an image ({e}); send a base64 PNG or JPEG") from None
    return image


def text_chunks(image: Image.Image) -> dict[str, str]:
    """The text chunks of a decoded image (``parameters`` among them when it has one)."""
    return {k: v for k, v in image.info.items() if isinstance(k, str) and isinstance(v, str)}

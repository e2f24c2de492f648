"""Invisible watermark of the txt2img scripts (invisible-watermark, ``dwtDct`` on the BGR image).

SD 1 / SD 2 embed a UTF-8 text (``bytes`` mode); SDXL embeds the fixed 48-bit message of Stability-AI's
``sgm.inference.helpers`` (``bits`` mode), given here as a tuple of 0/1 ints.

The library needs at least 256 x 256 = 65536 pixels (it raises below that) and, for the DWT and its
4 x 4 blocks, at least 8 pixels on each side; smaller images are returned unchanged with a notice.
"""
from __future__ import annotations

import logging
from typing import Sequence, Union

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

WATERMARK_V1 = "StableDiffusionV1"  # payload of the SD 1.x scripts
WATERMARK_V2 = "SDV2"  # payload of the SD 2.x scripts
WATERMARK_SDXL_MESSAGE = 0xB3EC907BB19E  # payload of the SDXL (sgm) scripts: 48 bits, chosen at random by them
WATERMARK_SDXL = tuple(int(bit) for bit in format(WATERMARK_SDXL_MESSAGE, "048b"))
WATERMARK_METHOD = "dwtDct"
Payload = Union[str, Sequence[int]]  # a text (bytes mode) or a sequence of bits (bits mode)
MIN_PIXELS = 256 * 256  # imwatermark: rows * cols below this raise
MIN_SIDE = 8  # below this the Haar DWT band holds no 4 x 4 block (or pywt raises)


def watermark_fits(width: int, height: int) -> bool:
    """True when an image of this size is large enough for the dwtDct watermark."""
    return width * height >= MIN_PIXELS and min(width, height) >= MIN_SIDE


def _bgr(image: Image.Image) -> np.ndarray:
    """PIL image -> uint8 BGR array [H, W, 3]."""
    import cv2

    return cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2BGR)


def put_watermark(image: Image.Image, payload: Payload) -> Image.Image:
    """Embed ``payload`` (a text as UTF-8 bytes, or a sequence of 0/1 bits) into an RGB image with dwtDct;
    too-small images come back unchanged."""
    if not watermark_fits(*image.size):
        logger.warning("image %dx%d is too small for the invisible watermark (needs >= %d pixels, >= %d per side); "
                    "left unmarked", image.size[0], image.size[1], MIN_PIXELS, MIN_SIDE)
        return image
    import cv2
    from imwatermark import WatermarkEncoder

    encoder = WatermarkEncoder()
    if isinstance(payload, str):
        encoder.set_watermark("bytes", payload.encode("utf-8"))
    else:
        encoder.set_watermark("bits", [int(bit) for bit in payload])
    marked = encoder.encode(_bgr(image), WATERMARK_METHOD)
    return Image.fromarray(cv2.cvtColor(marked, cv2.COLOR_BGR2RGB))


def read_watermark(image: Image.Image, n_bytes: int) -> bytes:
    """Decode an ``n_bytes`` dwtDct payload (not guaranteed to survive); b'' for too-small images."""
    if not watermark_fits(*image.size):
        logger.info("image %dx%d is too small to carry the invisible watermark; nothing read",
                    image.size[0], image.size[1])
        return b""
    from imwatermark import WatermarkDecoder

    return WatermarkDecoder("bytes", n_bytes * 8).decode(_bgr(image), WATERMARK_METHOD)


def read_watermark_bits(image: Image.Image, n_bits: int) -> tuple[int, ...]:
    """Decode an ``n_bits`` dwtDct bit payload (e.g. ``len(WATERMARK_SDXL)``) as 0/1 ints; () for too-small
    images."""
    if not watermark_fits(*image.size):
        return ()
    from imwatermark import WatermarkDecoder

    return tuple(int(bool(b)) for b in WatermarkDecoder("bits", n_bits).decode(_bgr(image), WATERMARK_METHOD))

"""The web UI's img2img resize modes: how an input picture is brought to the requested width x height.

0 "Just resize" stretches it; 1 "Crop and resize" scales it to cover the target and cuts the overhang equally on
both sides; 2 "Resize and fill" scales it to fit inside and fills the two bands left over by stretching its edge
rows (or columns) outwards. All three resample with Lanczos, as the web UI (and diffusers' ``VaeImageProcessor``
``resize_mode`` "default" / "crop" / "fill", which ``tests/test_resize_modes.py`` compares) do.
"""
from __future__ import annotations

from typing import Any

from PIL import Image

from ldm.inference.errors import UsageError

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill")
_ALIASES = {"just": 0, "resize": 0, "stretch": 0, "crop": 1, "fill": 2}


def resize_mode(value: Any) -> int:
    """0, 1 or 2 from a number or a name (``Just resize``, ``crop``, ``fill``...); UsageError otherwise."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        number = int(value)
        if 0 <= number < len(RESIZE_MODES):
            return number
        if number == 3:
            raise UsageError("resize mode 3 (Just resize, latent upscale) is not available: use 0 (just resize), "
                             "1 (crop and resize) or 2 (resize and fill)")
    else:
        name = str(value).strip().lower()
        for number, known in enumerate(RESIZE_MODES):
            if name == known.lower():
                return number
        if name in _ALIASES:
            return _ALIASES[name]
    raise UsageError(f"unknown resize mode {value!r}: use 0 / just (stretch), 1 / crop (crop and resize) or "
                     f"2 / fill (resize and fill)")


def resize_image(image: Image.Image, width: int, height: int, mode: int = 0) -> Image.Image:
    """``image`` at ``width`` x ``height`` by resize ``mode`` (see the module)."""
    if image.size == (width, height):
        return image
    if mode == 0:
        return image.resize((width, height), resample=Image.LANCZOS)
    wider_target = width * image.height > image.width * height  # the target's aspect ratio exceeds the picture's
    match_width = wider_target if mode == 1 else not wider_target
    if match_width:
        size = (width, image.height * width // image.width)
    else:
        size = (image.width * height // image.height, height)
    resized = image.resize(size, resample=Image.LANCZOS)
    canvas = Image.new(image.mode, (width, height))
    left, top = width // 2 - size[0] // 2, height // 2 - size[1] // 2
    canvas.paste(resized, box=(left, top))
    if mode == 2:
        _fill_bands(canvas, resized, left, top)
    return canvas


def _fill_bands(canvas: Image.Image, resized: Image.Image, left: int, top: int) -> None:
    """Stretch the first and last rows (picture above and below) or columns (left and right) of ``resized``
    over the empty bands of ``canvas`` on either side of it."""
    width, height = canvas.size
    w, h = resized.size
    if top > 0:  # bands above and below
        canvas.paste(resized.resize((width, top), box=(0, 0, w, 0)), box=(0, 0))
        canvas.paste(resized.resize((width, top), box=(0, h, w, h)), box=(0, top + h))
    elif left > 0:  # bands on the left and the right
        canvas.paste(resized.resize((left, height), box=(0, 0, 0, h)), box=(0, 0))
        canvas.paste(resized.resize((left, height), box=(w, 0, w, h)), box=(left + w, 0))

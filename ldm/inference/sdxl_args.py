"""The SDXL flags of the generation scripts (size / crop / aesthetic conditioning, the refiner) and their checks."""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from ldm.inference.errors import UsageError


def add_flags(p: argparse.ArgumentParser, mode: str) -> None:
    """The SDXL flags of the generation scripts (an ``argparse`` parser; the refiner's for txt2img/img2img)."""
    g = p.add_argument_group("SDXL (ignored by SD 1 / SD 2 models)")
    g.add_argument("--original_size", nargs="+", default=None, metavar="W H",
                   help="the size conditioning 'original size' as W H or WxH (default: the output size)")
    g.add_argument("--crop", nargs=2, type=int, default=(0, 0), metavar=("TOP", "LEFT"),
                   help="the crop conditioning: top and left crop coordinates in pixels (default 0 0)")
    g.add_argument("--aesthetic_score", type=float, default=6.0,
                   help="refiner: aesthetic score of the conditioning (default 6.0, as the original)")
    g.add_argument("--negative_aesthetic_score", type=float, default=2.5,
                   help="refiner: aesthetic score of the unconditional conditioning (default 2.5)")
    if mode in ("txt2img", "img2img"):
        g.add_argument("--refiner", type=Path, default=None, metavar="CKPT",
                       help="SDXL refiner checkpoint that finishes the base model's pictures")
        g.add_argument("--refiner_switch", type=float, default=0.8,
                       help="share of the sampling steps the base model runs before the refiner takes over "
                            "(default 0.8)")


def _size_pair(values: Optional[Sequence[str]]) -> Optional[tuple[int, int]]:
    """--original_size as (width, height) from ``W H`` or ``WxH``."""
    if values is None:
        return None
    parts = values[0].lower().split("x") if len(values) == 1 else list(values)
    try:
        width, height = (int(v) for v in parts)
    except ValueError:
        width = height = 0
    if width < 1 or height < 1:
        raise UsageError(f"--original_size takes a width and a height in pixels (W H or WxH), got "
                         f"'{' '.join(values)}'")
    return width, height


def options_from(ns: argparse.Namespace, refiner: Optional[Path]) -> Any:
    """The SDXL settings of parsed flags (``ldm.inference.sdxl.SdxlOptions``), checked (``refiner``: the checked
    --refiner path)."""
    from ldm.inference.sdxl import SdxlOptions

    if min(ns.crop) < 0:
        raise UsageError(f"--crop takes the top and left crop coordinates (>= 0), got {ns.crop[0]} {ns.crop[1]}")
    for flag, value in (("--aesthetic_score", ns.aesthetic_score),
                        ("--negative_aesthetic_score", ns.negative_aesthetic_score)):
        if not math.isfinite(value):
            raise UsageError(f"{flag} must be a finite number, got {value}")
    switch = getattr(ns, "refiner_switch", 0.8)
    if not 0.0 < switch < 1.0:
        raise UsageError(f"--refiner_switch must be between 0 and 1 (the share of steps the base model runs), "
                         f"got {switch}")
    return SdxlOptions(original_size=_size_pair(ns.original_size), crop=(int(ns.crop[0]), int(ns.crop[1])),
                       aesthetic_score=ns.aesthetic_score, negative_aesthetic_score=ns.negative_aesthetic_score,
                       refiner=refiner, refiner_switch=switch)

"""The ranges of the generation numbers, checked alike for the scripts' flags and the API's fields (each names
its values its own way: ``--scale`` there, ``cfg_scale`` here); every failure is one ``UsageError`` line."""
from __future__ import annotations

import math
from typing import Iterable, Optional

from ldm.inference.errors import UsageError

MAX_SCALE = 50.0  # |scale| above this only saturates the picture (the common web UIs stop at 30)
MAX_ETA = 1.0  # DDIM's eta > 1 makes the noise larger than the remaining signal allows (NaN pictures)
MAX_SEED = 2 ** 63  # seeds are torch generator seeds: 0 .. 2**63 - 1


def at_least(values: Iterable[tuple[str, Optional[float], float]]) -> None:
    """Each ``(name, value, low)`` with a value below ``low`` is an error (None: not given, fine)."""
    for name, value, low in values:
        if value is not None and value < low:
            raise UsageError(f"{name} must be at least {low}, got {value}")


def finite(name: str, value: float) -> None:
    """NaN and infinities are errors."""
    if not math.isfinite(value):
        raise UsageError(f"{name} must be a finite number, got {value}")


def guidance_scale(name: str, value: float) -> None:
    """A finite classifier-free guidance scale within +-MAX_SCALE."""
    finite(name, value)
    if abs(value) > MAX_SCALE:
        raise UsageError(f"{name} must be between -{MAX_SCALE:g} and {MAX_SCALE:g} (7.5 is usual; larger values "
                         f"only saturate the picture), got {value}")


def eta(name: str, value: Optional[float]) -> None:
    """DDIM's eta (None: the sampler's own) between 0 and MAX_ETA."""
    if value is None:
        return
    finite(name, value)
    if value < 0:
        raise UsageError(f"{name} must be >= 0, got {value}")
    if value > MAX_ETA:
        raise UsageError(f"{name} must be at most {MAX_ETA:g} (1: as much noise as DDPM), got {value}")


def strength(name: str, value: Optional[float]) -> None:
    """An img2img strength (None: not used) between 0 and 1."""
    if value is None:
        return
    finite(name, value)
    if not 0.0 <= value <= 1.0:
        raise UsageError(f"{name} must be between 0 and 1 (0 keeps the input image, 1 replaces it), got {value}")


def seed(name: str, value: Optional[int], none_means: str = "") -> None:
    """A seed (None: allowed when ``none_means`` says what it does) between 0 and 2**63 - 1."""
    if value is None and none_means:
        return
    if value is None or not 0 <= value < MAX_SEED:
        extra = f" (or None for {none_means})" if none_means else ""
        raise UsageError(f"{name} must be between 0 and 2**63 - 1{extra}, got {value}")

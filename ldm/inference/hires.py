"""Hires. fix, the web UI's two-pass txt2img: a picture at the asked size, upscaled, then img2img at the larger size.

The first pass is plain txt2img. Its latents are upscaled in latent space (the ``Latent ...`` upscalers:
``torch.nn.functional.interpolate`` with the web UI's modes) or decoded, resized with PIL (``Lanczos``,
``Nearest``, ``None`` = Lanczos) and encoded again. The second pass denoises them from the level ``strength``
picks (the web UI's "Denoising strength", default 0.7) in ``steps`` steps (0: the first pass's), with the same
prompts and guidance, and fresh generators seeded with each image's seed (its first draw: the start noise at
the new size, as the web UI re-creates it from the seed). The PNG ``parameters`` carry the first pass's size and
``Hires upscale``/``Hires resize``, ``Hires steps`` and ``Hires upscaler``, as the web UI writes them.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from ldm import samplers
from ldm.inference import ranges
from ldm.inference.errors import UsageError
from ldm.samplers import SamplerChoice, StepInfo
from ldm.samplers.noise import draw

# the web UI's latent upscalers: name -> (interpolate mode, antialias)
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
# its built-in picture upscalers ("None" resizes with Lanczos, as the web UI does after a no-op upscaler)
IMAGE_UPSCALERS = {"None": Image.LANCZOS, "Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = tuple(LATENT_UPSCALERS) + tuple(IMAGE_UPSCALERS)
MAX_SCALE = 4.0
DEFAULT_STRENGTH = 0.7


@dataclass(frozen=True)
class HiresOptions:
    """The second pass: upscale factor (or target size), upscaler, steps (0: the first pass's) and strength."""

    scale: float = 2.0
    upscaler: str = "Latent"
    steps: int = 0
    strength: float = DEFAULT_STRENGTH
    resize_x: int = 0  # a target width instead of ``scale`` (0: from ``scale`` or from resize_y's aspect)
    resize_y: int = 0


def upscaler_name(name: str) -> str:
    """The upscaler's table name (case-insensitive); UsageError listing the known ones."""
    for known in UPSCALERS:
        if known.lower() == str(name).strip().lower():
            return known
    raise UsageError(f"unknown hires upscaler '{name}': use one of {', '.join(UPSCALERS)} (model upscalers such as "
                     f"ESRGAN are not available)")


def checked(h: HiresOptions) -> HiresOptions:
    """``h`` with its upscaler's table name; UsageError for values out of range."""
    ranges.finite("hr_scale", h.scale)
    if not 1.0 <= h.scale <= MAX_SCALE:
        raise UsageError(f"hr_scale must be from 1 to {MAX_SCALE:g}, got {h.scale:g}")
    ranges.at_least((("hr_second_pass_steps", h.steps, 0), ("hr_resize_x", h.resize_x, 0),
                     ("hr_resize_y", h.resize_y, 0)))
    ranges.strength("denoising_strength (hires)", h.strength)
    if h.strength <= 0:
        raise UsageError("a hires second pass with denoising strength 0 changes nothing: give 0.3-0.8, or turn the "
                         "hires fix off")
    return dataclasses.replace(h, upscaler=upscaler_name(h.upscaler))


def target_size(h: HiresOptions, width: int, height: int, factor: int) -> tuple[int, int]:
    """(width, height) of the second pass, multiples of ``factor``; UsageError for a target that changes the
    aspect ratio (the web UI crops then; this does not)."""
    if h.resize_x and h.resize_y:
        if abs(h.resize_x * height - h.resize_y * width) > factor * max(width, height):
            raise UsageError(f"hr_resize {h.resize_x}x{h.resize_y} does not keep the {width}x{height} aspect ratio: "
                             f"give one of hr_resize_x/hr_resize_y (the other follows), or use hr_scale")
        w, hh = h.resize_x, h.resize_y
    elif h.resize_x:
        w, hh = h.resize_x, round(height * h.resize_x / width)
    elif h.resize_y:
        w, hh = round(width * h.resize_y / height), h.resize_y
    else:
        w, hh = int(width * h.scale), int(height * h.scale)
    w, hh = max(factor, w - w % factor), max(factor, hh - hh % factor)
    if w < width or hh < height:
        raise UsageError(f"the hires size {w}x{hh} is smaller than the first pass's {width}x{height}: a hires fix "
                         f"only enlarges")
    return w, hh


def settings(h: HiresOptions, size: tuple[int, int]) -> dict[str, str]:
    """The web UI's parameters keys of a hires run (after ``Denoising strength``)."""
    items = ({"Hires resize": f"{size[0]}x{size[1]}"} if h.resize_x or h.resize_y else
             {"Hires upscale": f"{h.scale:g}"})
    if h.steps:
        items["Hires steps"] = str(h.steps)
    items["Hires upscaler"] = h.upscaler
    return items


def add_settings(parameters: str, h: HiresOptions, size: tuple[int, int]) -> str:
    """A ``parameters`` text with the hires settings appended to its settings line."""
    from ldm.inference.metadata import quote

    return parameters + ", " + ", ".join(f"{k}: {quote(v)}" for k, v in settings(h, size).items())


def add_flags(p: Any) -> None:
    """The hires flags of scripts/txt2img.py (an ``argparse`` parser)."""
    g = p.add_argument_group("hires fix (two passes: generate, upscale, img2img at the larger size)")
    g.add_argument("--hires", "--enable_hr", dest="hires", action="store_true", help="turn the hires fix on")
    g.add_argument("--hr_scale", type=float, default=2.0, help="upscale factor of the second pass (default 2)")
    g.add_argument("--hr_upscaler", default="Latent", metavar="NAME",
                   help=f"how the first picture is enlarged: {', '.join(UPSCALERS)} (default Latent)")
    g.add_argument("--hr_steps", "--hr_second_pass_steps", dest="hr_steps", type=int, default=0,
                   help="steps of the second pass (default 0: as many as the first)")
    g.add_argument("--hr_strength", "--denoising_strength", dest="hr_strength", type=float,
                   default=DEFAULT_STRENGTH, help=f"denoising strength of the second pass (default {DEFAULT_STRENGTH})")
    g.add_argument("--hr_resize_x", type=int, default=0, help="target width instead of --hr_scale (0: unset)")
    g.add_argument("--hr_resize_y", type=int, default=0, help="target height instead of --hr_scale (0: unset)")


def options_from(ns: Any) -> Optional[HiresOptions]:
    """The checked hires options of parsed flags (None when ``--hires`` is off); UsageError for hires flags given
    without ``--hires``."""
    if not hasattr(ns, "hr_scale"):  # img2img and inpaint have no hires flags
        return None
    if not ns.hires:
        d = HiresOptions()
        given = [flag for flag, value, default in (("--hr_scale", ns.hr_scale, d.scale),
                                                   ("--hr_upscaler", ns.hr_upscaler, d.upscaler),
                                                   ("--hr_steps", ns.hr_steps, d.steps),
                                                   ("--denoising_strength", ns.hr_strength, d.strength),
                                                   ("--hr_resize_x", ns.hr_resize_x, d.resize_x),
                                                   ("--hr_resize_y", ns.hr_resize_y, d.resize_y))
                 if value != default]
        if given:
            raise UsageError(f"{', '.join(given)} set the hires fix's second pass: add --hires to turn it on")
        return None
    return checked(HiresOptions(ns.hr_scale, ns.hr_upscaler, ns.hr_steps, ns.hr_strength, ns.hr_resize_x,
                                ns.hr_resize_y))


def upscale(model: Any, z: torch.Tensor, h: HiresOptions, size: tuple[int, int], factor: int,
            decode: Callable[[torch.Tensor], torch.Tensor], gens: Sequence[torch.Generator]) -> torch.Tensor:
    """First-pass latents [B, C, h, w] -> latents at ``size`` (pixels): interpolated in latent space, or decoded,
    resized as pictures and encoded (each image's posterior sample drawn from its generator)."""
    if h.upscaler in LATENT_UPSCALERS:
        mode, antialias = LATENT_UPSCALERS[h.upscaler]
        cells = (size[1] // factor, size[0] // factor)
        return F.interpolate(z.float(), size=cells, mode=mode, antialias=antialias).to(z.dtype)
    from ldm.inference.pipeline import image_tensor, to_numpy
    from ldm.modules.safety import numpy_to_pil

    pictures = numpy_to_pil(to_numpy(decode(z).float()))
    batch = torch.cat([image_tensor(p.resize(size, IMAGE_UPSCALERS[h.upscaler]), z.device) for p in pictures])
    posterior = model.encode_first_stage(batch.to(next(model.first_stage_model.parameters()).dtype))
    mean, std = posterior.mean.float(), posterior.std.float()
    return model.scale_factor * (mean + std * draw(gens, mean.shape[1:], mean.device))


def second_pass(model: Any, choice: SamplerChoice, z: torch.Tensor, h: HiresOptions, size: tuple[int, int],
                factor: int, first_steps: int, denoiser: Any, cond: Any, seeds: Sequence[int],
                eta: Optional[float], decode: Callable[[torch.Tensor], torch.Tensor],
                callback: Optional[Callable[[StepInfo], Any]] = None) -> torch.Tensor:
    """Latents [B, C, H/f, W/f] of the second pass from the first pass's latents ``z``."""
    from ldm.inference.pipeline import generators

    gens = generators(seeds)
    noise = draw(gens, (z.shape[1], size[1] // factor, size[0] // factor), z.device)  # each seed's first draw
    z0 = upscale(model, z, h, size, factor, decode, gens)
    return samplers.sample(choice, denoiser, noise, h.steps or first_steps, cond, init=z0, strength=h.strength,
                           eta=eta, gens=list(gens), callback=callback)


def offset_callback(callback: Optional[Callable[[StepInfo], Any]], done: int) -> Optional[Callable[[StepInfo], Any]]:
    """``callback`` with the second pass's steps counted after the first pass's ``done`` ones."""
    if callback is None:
        return None
    return lambda info: callback(dataclasses.replace(info, i=info.i + done))

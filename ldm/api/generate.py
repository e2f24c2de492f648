"""The public requests: txt2img / img2img / inpaint on a loaded model, returning images with their parameters."""
from __future__ import annotations

import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from PIL import Image

from ldm import samplers
from ldm.api.model import LoadedModel
from ldm.api.task import Cancelled, ProgressCallback, Settings, StepWatch, Task
from ldm.inference import hires, inpaint, limits, pipeline, ranges
from ldm.inference.errors import UsageError
from ldm.inference.resize import resize_image, resize_mode
from ldm.inference.sdxl import SDXL, default_options as sdxl_default_options

logger = logging.getLogger(__name__)

DEFAULT_SAMPLER = "ddim"  # the original scripts' sampler, for SD 1/2 requests that name none


@dataclass(frozen=True)
class Request:
    """One generation request; ``None`` sizes take the model's (or the input image's), ``seed`` None is random."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 50
    sampler: Optional[str] = None  # None: the model's own default (DDIM for SD 1/2, the original Euler for SDXL)
    schedule: Optional[str] = None  # None or "automatic": the sampler's default
    cfg_scale: float = 7.5
    seed: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None
    batch_size: int = 1
    n_iter: int = 1
    eta: Optional[float] = None
    strength: Optional[float] = None  # img2img default 0.75; inpaint: 1 for inpainting models, else 0.75
    init_image: Optional[Image.Image] = None
    mask: Optional[Image.Image] = None  # white = repaint
    mask_blur: int = 4
    invert_mask: bool = False
    full_res: bool = False  # repaint only the masked area at width x height ("Only masked")
    full_res_padding: int = 32
    sdxl: Optional[Any] = None  # SDXL models: ldm.inference.sdxl.SdxlOptions (original size, crop, refiner...)
    clip_skip: int = 1  # the web UI's "Clip skip" (SD 1 text encoders; 2 is the usual choice)
    hires: Optional[hires.HiresOptions] = None  # txt2img: the hires fix (upscale + img2img at the larger size)
    resize_mode: Any = 0  # img2img / inpaint: 0 just resize, 1 crop and resize, 2 resize and fill (or their names)


@dataclass
class Result:
    """The images of a request with their ``parameters`` texts, seeds and prompts (one entry per image)."""

    images: list[Image.Image] = field(default_factory=list)
    parameters: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)
    flagged: list[bool] = field(default_factory=list)
    interrupted: bool = False  # cancelled: the last batch shows the estimate at the step it stopped
    request: Optional[Request] = None
    settings: Optional[Settings] = None
    model_name: Optional[str] = None
    model_hash: Optional[str] = None

    def info(self) -> dict[str, Any]:
        """The web UI's ``info`` fields (``seed``, ``all_seeds``, ``infotexts``...) of this result."""
        request, settings = self.request, self.settings
        return {"prompt": request.prompt, "all_prompts": self.prompts, "negative_prompt": request.negative_prompt,
                "seed": self.seeds[0] if self.seeds else request.seed, "all_seeds": self.seeds,
                "subseed": -1, "all_subseeds": [-1] * len(self.seeds),
                "width": settings.width if settings else request.width,
                "height": settings.height if settings else request.height,
                "sampler_name": settings.sampler.label if settings else request.sampler,
                "cfg_scale": request.cfg_scale, "steps": request.steps, "batch_size": request.batch_size,
                "denoising_strength": settings.strength if settings and settings.mode != "txt2img" else None,
                "index_of_first_image": 0, "infotexts": self.parameters, "interrupted": self.interrupted,
                "sd_model_name": self.model_name, "sd_model_hash": self.model_hash}

    def info_json(self) -> str:
        """``info`` as the JSON string the web UI sends."""
        return json.dumps(self.info())


def valid_side(name: str, value: int, factor: int) -> int:
    """``value`` if it is a multiple of the model's factor, else UsageError proposing the nearest ones."""
    if value % factor:
        low = value - value % factor
        options = " or ".join(str(v) for v in (low, low + factor) if v >= factor)
        raise UsageError(f"{name} {value} is not a multiple of {factor} (the model's downsampling factor): "
                         f"use {options}")
    return value


def _check_numbers(m: LoadedModel, r: Request) -> None:
    if not isinstance(r.prompt, str):
        raise UsageError("prompt must be a text")
    ranges.at_least((("steps", r.steps, 1), ("batch_size", r.batch_size, 1), ("n_iter", r.n_iter, 1),
                     ("width", r.width, 1), ("height", r.height, 1), ("mask_blur", r.mask_blur, 0),
                     ("full_res_padding", r.full_res_padding, 0), ("clip_skip", r.clip_skip, 1)))
    if r.steps > m.geometry.timesteps:
        raise UsageError(f"steps {r.steps} exceeds the model's {m.geometry.timesteps} diffusion timesteps")
    ranges.guidance_scale("cfg_scale", r.cfg_scale)
    ranges.eta("eta", r.eta)
    ranges.strength("strength (denoising_strength)", r.strength)
    ranges.seed("seed", r.seed, none_means="a random one")


def _sampler(m: LoadedModel, r: Request) -> samplers.SamplerChoice:
    schedule = None if r.schedule in (None, "", "automatic", "Automatic") else r.schedule
    name = r.sampler
    if name is None:  # as the scripts without --sampler
        name, schedule = sdxl_default_options(None, schedule) if m.kind == SDXL else (DEFAULT_SAMPLER, schedule)
    try:
        return samplers.resolve(name, schedule)
    except samplers.UnknownSampler as e:
        raise UsageError(str(e)) from None


def _sized(image: Image.Image, factor: int, width: Optional[int], height: Optional[int],
           mode: int = 0) -> Image.Image:
    """RGB ``image`` brought to width x height by resize ``mode`` (default: its own size cut down to a multiple of
    factor)."""
    image = pipeline._rgb(image)
    w, h = image.size
    target = (width or w - w % factor, height or h - h % factor)
    if min(target) < factor:
        raise UsageError(f"the input image is {w}x{h} pixels; it needs at least {factor} pixels per side")
    return resize_image(image, *target, mode)


def _canvas(m: LoadedModel, r: Request, width: Optional[int], height: Optional[int]) -> tuple[Any, Any]:
    """(canvas, options) of an inpaint request: image and mask (white = repaint) at the image's size."""
    if r.init_image is None or r.mask is None:
        raise UsageError("inpaint needs an input image and a mask (white = repaint)")
    opts = inpaint.InpaintOptions(None, r.mask_blur, r.invert_mask, (0, 0, 0, 0), "edge", r.full_res,
                                  r.full_res_padding, r.strength is not None)
    f = m.geometry.factor
    mode = resize_mode(r.resize_mode)
    image = _sized(r.init_image, f, None if r.full_res else width, None if r.full_res else height, mode)
    mask = pipeline._rgb(r.mask)
    if mode and mask.size == r.init_image.size:  # cropped or filled as the picture is
        mask = resize_image(mask, *image.size, mode)
    mask = mask.convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, resample=Image.BILINEAR)
    if r.invert_mask:
        mask = Image.eval(mask, lambda v: 255 - v)
    canvas = inpaint.build_canvas(image, mask, opts, width, height, m.geometry.native_pixels)
    return canvas, opts


def settings_for(m: LoadedModel, r: Request, mode: str) -> Settings:
    """Check a request against the model; UsageError naming the problem and the fix."""
    _check_numbers(m, r)
    if m.inpainting and mode != "inpaint":
        raise UsageError(f"'{m.name}' is an inpainting model: it needs an input image and a mask (inpaint)")
    f = m.geometry.factor
    width = valid_side("width", r.width, f) if r.width is not None else None
    height = valid_side("height", r.height, f) if r.height is not None else None
    init = canvas = opts = None
    strength = 1.0
    if mode == "img2img":
        if r.init_image is None:
            raise UsageError("img2img needs an input image (init_images)")
        init = _sized(r.init_image, f, width, height, resize_mode(r.resize_mode))
        width, height = init.size
        strength = 0.75 if r.strength is None else r.strength
    elif mode == "inpaint":
        canvas, opts = _canvas(m, r, width, height)
        width, height = canvas.size
        default = inpaint.INPAINT_STRENGTH if m.inpainting else inpaint.IMG2IMG_STRENGTH
        strength = default if r.strength is None else r.strength
    width, height = width or m.geometry.native_pixels, height or m.geometry.native_pixels
    limits.check_size(width, height, False)
    fix = None
    if r.hires is not None:
        if mode != "txt2img" or m.kind == SDXL:
            raise UsageError("the hires fix is for txt2img with SD 1/2 models (SDXL generates at 1024 pixels)")
        fix = hires.checked(r.hires)
        limits.check_size(*hires.target_size(fix, width, height, f), False)
    choice = _sampler(m, r)
    return Settings(mode, r.negative_prompt, r.steps, choice, r.cfg_scale, width, height,
                    r.eta if choice.spec.stochastic else None, strength, init, canvas, opts, sdxl=r.sdxl,
                    clip_skip=r.clip_skip, hires=fix)


def random_seed() -> int:
    """A random seed as the web UI draws them (below 2**32)."""
    return secrets.randbelow(2 ** 32 - 1)


def generate(m: LoadedModel, r: Request, mode: str, progress: ProgressCallback = None,
             cancel: Any = None) -> Result:
    """Run a request: batch_size images per batch, n_iter batches, image k seeded with seed + k.

    ``progress`` is called after every sampler step; ``cancel`` (e.g. a ``threading.Event``) is checked after
    every step: when set, the run stops and the interrupted batch's images show its current estimate.
    """
    s = settings_for(m, r, mode)
    seed = r.seed if r.seed is not None else random_seed()
    jobs = pipeline.plan_jobs([r.prompt], r.batch_size, r.n_iter, seed)
    m.loras.specs_for(r.prompt)  # an unknown <lora:NAME> fails before any work
    task = Task(m, s)
    result = Result(request=r, settings=s, model_name=m.name, model_hash=m.model_hash)
    for index, job in enumerate(jobs):
        watch = StepWatch(task, index, len(jobs), progress, cancel)
        try:
            latents = task.latents(job, watch)
        except Cancelled:
            result.interrupted = True
            if watch.denoised is None:
                break
            latents = watch.denoised
        limits.check_finite(latents, "the sampled latents", m.precision.reduced)
        images, flags = task.images(latents)
        for image, prompt, seed_k, flag in zip(images, job.prompts, job.seeds, flags):
            result.images.append(image)
            result.parameters.append(task.parameters(prompt, seed_k))
            result.seeds.append(seed_k)
            result.prompts.append(prompt)
            result.flagged.append(flag)
        if result.interrupted or (cancel is not None and cancel.is_set()):
            result.interrupted = True
            break
    return result

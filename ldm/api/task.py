"""One generation request on a loaded model: the checked settings, the per-batch latents and their images.

The conditioning and sampling of a model kind live in one function (:func:`sd_latents` for SD 1 / SD 2); the
table :data:`LATENTS` picks it by ``LoadedModel.kind``, so another kind is one function and one table entry.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from PIL import Image

from ldm.api.model import SD, LoadedModel
from ldm.inference import hires, inpaint, pipeline, sdxl_session
from ldm.inference.errors import UsageError
from ldm.inference.metadata import ImageParameters, format_parameters
from ldm.modules.safety import numpy_to_pil
from ldm.samplers import SamplerChoice, StepInfo
from ldm.samplers.schedules import USER_SCHEDULES

logger = logging.getLogger(__name__)

PREVIEW_HALVE_FROM = 32  # latent cells per side from which previews are decoded at half resolution


@dataclass(frozen=True)
class Settings:
    """Checked settings of one request (sizes in pixels; the init image or canvas already at its size)."""

    mode: str  # txt2img, img2img or inpaint
    negative_prompt: str
    steps: int
    sampler: SamplerChoice
    scale: float
    width: int
    height: int
    eta: Optional[float] = None  # None: the sampler's default
    strength: float = 1.0  # img2img / inpaint
    init_image: Optional[Image.Image] = None  # img2img
    canvas: Optional[inpaint.Canvas] = None  # inpaint
    inpaint: Optional[inpaint.InpaintOptions] = None  # inpaint (for the parameters text)
    sdxl: Optional[Any] = None  # ldm.inference.sdxl.SdxlOptions (size/crop/aesthetic conditioning, refiner)
    clip_skip: int = 1  # the web UI's "Clip skip" asked for (Task.clip_skip: what the model takes)
    hires: Optional[hires.HiresOptions] = None  # txt2img: the hires fix's second pass (checked)


class Task:
    """What every batch of a request shares: the sampler, the latent shape, the encoded init image or canvas."""

    def __init__(self, m: LoadedModel, s: Settings):
        self.m, self.s = m, s
        self.shape = (m.geometry.channels, s.height // m.geometry.factor, s.width // m.geometry.factor)
        self.warned: set = set()
        self.posterior = self.prepared = self.sdxl = None
        self.clip_skip = pipeline.effective_clip_skip(m.model, s.clip_skip)
        self.out_size = (s.width, s.height)  # the saved pictures' size
        if s.hires is not None:
            if m.kind != SD or s.mode != "txt2img":
                raise UsageError("the hires fix is for txt2img with SD 1/2 models (SDXL generates at 1024 pixels)")
            self.out_size = hires.target_size(s.hires, s.width, s.height, m.geometry.factor)
        if m.kind == sdxl_session.SDXL:  # SDXL's conditioning, sampling, refiner: ldm.inference.sdxl_session
            self.sdxl = sdxl_session.session_for(m, s)
            self.prepared = self.sdxl.prepared  # inpaint: the canvas the decoded pictures are pasted into
            self.steps_per_image = self.sdxl.steps_per_image
            return
        with torch.no_grad(), m.precision.scope():
            if s.mode == "img2img":
                mean, std = pipeline.encode_init(m.model, pipeline.image_tensor(s.init_image, m.device))
                self.posterior = (mean.float(), std.float())
            elif s.mode == "inpaint":
                self.prepared = inpaint.prepare(m.model, s.canvas, m.inpainting, m.device)
        strength = s.strength if s.mode != "txt2img" else None
        self.first_pass_steps = pipeline.sampler_steps(m.model, s.sampler, s.steps, strength)
        self.steps_per_image = self.first_pass_steps
        if s.hires is not None:
            self.steps_per_image += pipeline.sampler_steps(m.model, s.sampler, s.hires.steps or s.steps,
                                                           s.hires.strength)

    @torch.no_grad()
    def latents(self, job: pipeline.Job, callback: pipeline.StepCallback = None) -> torch.Tensor:
        """Sampled latents [B, C, h, w] of one job (its ``<lora:...>`` tags merged and removed first)."""
        job = self.m.loras.prepare_job(job)
        with self.m.precision.scope(), pipeline.clip_skip(self.m.model, self.clip_skip):
            return LATENTS[self.m.kind](self, job, callback)

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> tuple[list[Image.Image], list[bool]]:
        """Decoded, safety-checked PIL images of a batch and which of them were flagged."""
        images = pipeline.to_numpy(self._decode(latents))
        if self.s.canvas is not None:  # pasted into the input through the blurred mask
            images = inpaint.to_array(inpaint.composite(self.prepared, numpy_to_pil(images)))
        flags = [False] * len(images)
        if self.m.checker is not None:
            images, flags = self.m.checker.check(images)
        return numpy_to_pil(images), list(flags)

    def preview(self, denoised: torch.Tensor) -> Image.Image:
        """The first image of a batch's current denoised estimate [B, C, h, w], decoded alone (no checks) at half
        resolution when its latent is 32 cells or more (a quarter of the decoding cost), shown at the image size."""
        z = denoised[:1].detach()
        if min(z.shape[-2:]) >= PREVIEW_HALVE_FROM:
            z = torch.nn.functional.avg_pool2d(z, 2)
        with torch.no_grad():
            x = self._decode(z)
        image = numpy_to_pil(pipeline.to_numpy(x))[0]
        return image if image.size == self.out_size else image.resize(self.out_size)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] of latents z [B, C, h, w] (SDXL: its float32 VAE)."""
        if self.sdxl is not None:
            return self.sdxl.images(z, self.m.precision.reduced)
        return pipeline.decode(self.m.model, z, self.m.precision)

    def parameters(self, prompt: str, seed: int) -> str:
        """The PNG ``parameters`` text of one image (web UI format, its own seed)."""
        s, m = self.s, self.m
        text = format_parameters(ImageParameters(
            prompt=prompt, negative_prompt=s.negative_prompt, steps=s.steps, sampler=s.sampler.label,
            schedule_type=s.sampler.schedule_label if s.sampler.schedule in USER_SCHEDULES else None,
            cfg_scale=s.scale, seed=seed, width=s.width, height=s.height, model=m.name, model_hash=m.model_hash,
            denoising_strength=s.strength if s.mode in ("img2img", "inpaint") else
            s.hires.strength if s.hires is not None else None,
            eta=s.eta if s.eta is not None and s.eta != s.sampler.spec.eta else None, vae=m.vae_name,
            clip_skip=self.clip_skip))
        text = sdxl_session.parameters(text, s.sdxl)
        if s.hires is not None:
            text = hires.add_settings(text, s.hires, self.out_size)
        return inpaint.add_settings(text, s.inpaint) if s.inpaint is not None else text


def sd_latents(task: Task, job: pipeline.Job, callback: pipeline.StepCallback) -> torch.Tensor:
    """SD 1 / SD 2: text conditioning (web UI prompt syntax) and sampling of one job -> latents [B, C, h, w]."""
    s, model = task.s, task.m.model
    gens = pipeline.generators(job.seeds)
    cond, uncond = pipeline.conditioning(model, job, s.negative_prompt, s.scale, task.warned)
    if s.mode == "img2img":
        return pipeline.sample_img2img(model, s.sampler, task.posterior, cond, uncond, s.steps, s.strength, s.scale,
                                       gens, s.eta, callback)
    if s.mode == "inpaint":
        return inpaint.sample_inpaint(model, s.sampler, task.prepared, cond, uncond, s.steps, s.strength, s.scale,
                                      gens, s.eta, callback)
    x_T = pipeline.draw(gens, task.shape, task.m.device)
    z = pipeline.sample_txt2img(model, s.sampler, x_T, cond, uncond, s.steps, s.scale, gens, s.eta, callback)
    if s.hires is None:
        return z
    return hires.second_pass(model, s.sampler, z, s.hires, task.out_size, task.m.geometry.factor, s.steps,
                             pipeline.guided_denoiser(model, uncond, s.scale), cond, job.seeds, s.eta, task._decode,
                             hires.offset_callback(callback, task.first_pass_steps))


# model kind -> its conditioning + sampling function (task, job, step callback) -> latents
LATENTS: dict[str, Callable[[Task, pipeline.Job, pipeline.StepCallback], torch.Tensor]] = {
    SD: sd_latents, sdxl_session.SDXL: sdxl_session.task_latents}


class Cancelled(Exception):
    """Raised inside a sampler step when the request's cancel event is set."""


@dataclass
class Progress:
    """Where a request stands after a sampler step; ``preview()`` decodes the current estimate (on demand)."""

    step: int  # steps done in the current batch (1..total)
    total: int  # steps per batch
    batch: int  # index of the current batch
    batches: int
    preview: Callable[[], Image.Image]

    @property
    def fraction(self) -> float:
        """Share of the whole request done, in [0, 1]."""
        return (self.batch * self.total + self.step) / max(self.batches * self.total, 1)


ProgressCallback = Optional[Callable[[Progress], Any]]


class StepWatch:
    """The step callback of one batch: remembers the last estimate, reports progress, honours cancellation."""

    def __init__(self, task: Task, batch: int, batches: int, progress: ProgressCallback, cancel: Any):
        self.task, self.batch, self.batches = task, batch, batches
        self.progress, self.cancel = progress, cancel
        self.denoised: Optional[torch.Tensor] = None

    def __call__(self, info: StepInfo) -> None:
        """Called by the sampler after each step."""
        self.denoised = info.denoised
        if self.progress is not None:
            estimate = info.denoised
            self.progress(Progress(info.i + 1, self.task.steps_per_image, self.batch, self.batches,
                                   lambda: self.task.preview(estimate)))
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled()

"""A whole txt2img / img2img run: validate everything first, then load, generate, check and save."""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Optional

import torch
from PIL import Image

from ldm.inference import accel, inpaint, limits, loading, pipeline
from ldm.inference.args import Options, read_prompts
from ldm.inference.errors import UsageError
from ldm.samplers.schedules import USER_SCHEDULES
from ldm.inference.metadata import ImageParameters, file_hash, format_parameters
from ldm.inference.outputs import OutputWriter, check_writable
from ldm.modules.lora import LoraSession
from ldm.modules.safety import numpy_to_pil

logger = logging.getLogger(__name__)

# progress(total, description) -> context manager whose value has ``update(n)`` (e.g. ``tqdm``).
ProgressFactory = Callable[[int, str], ContextManager[Any]]


class _NoBar:
    def update(self, n: int = 1) -> None:
        """Ignore progress."""


def no_progress(total: int, desc: str) -> ContextManager[Any]:
    """Progress factory that shows nothing."""
    return contextlib.nullcontext(_NoBar())


@dataclass
class Plan:
    """Everything checked before anything heavy is loaded or any file written."""

    opts: Options
    source: loading.ModelSource
    config: Any
    geometry: loading.ModelGeometry
    width: int
    height: int
    prompts: list[str]
    init_image: Optional[Image.Image] = None
    canvas: Optional[inpaint.Canvas] = None  # the inpaint mode's picture and mask


@dataclass
class RunResult:
    """What a run wrote, and how long the images took."""

    samples: list[Path] = field(default_factory=list)
    grid: Optional[Path] = None
    n_images: int = 0
    seconds: float = 0.0
    flagged: int = 0

    def summary(self, outdir: Path) -> str:
        """One line: where the files went and the time per image."""
        def count(n: int) -> str:
            return f"{n} image{'' if n == 1 else 's'}"

        where = f"{count(len(self.samples))} in {outdir / 'samples'}" if self.samples else "no single images saved"
        grid = f", grid {self.grid}" if self.grid else ""
        flagged = f"; {self.flagged} replaced by the safety checker" if self.flagged else ""
        per = self.seconds / max(self.n_images, 1)
        return f"Done: {where}{grid}; {count(self.n_images)} made, {per:.2f} s per image{flagged}"


def _valid_side(flag: str, value: int, factor: int) -> int:
    if value % factor:
        low = value - value % factor
        options = " or ".join(str(v) for v in (low, low + factor) if v >= factor)
        raise UsageError(f"{flag} {value} is not a multiple of {factor} (the model's downsampling factor): "
                         f"use {options}")
    return value


def check_geometry(opts: Options, geometry: loading.ModelGeometry) -> None:
    """--C/--f must match the model (they are derived from it); steps must fit its schedule."""
    if opts.factor is not None and opts.factor != geometry.factor:
        raise UsageError(f"--f {opts.factor} does not match the model, whose autoencoder downsamples by "
                         f"{geometry.factor}: drop --f")
    if opts.latent_channels is not None and opts.latent_channels != geometry.channels:
        raise UsageError(f"--C {opts.latent_channels} does not match the model's {geometry.channels} latent "
                         f"channels: drop --C")
    if opts.steps > geometry.timesteps:
        raise UsageError(f"--ddim_steps {opts.steps} exceeds the model's {geometry.timesteps} diffusion timesteps")


def _prompts(opts: Options, source: loading.ModelSource) -> list[str]:
    if opts.from_file is not None:
        return read_prompts(opts.from_file)
    if opts.prompt is not None:
        return [opts.prompt]
    return [loading.DEFAULT_MODEL_PROMPT if source.is_default else loading.ORIGINAL_DEFAULT_PROMPT]


_RUNNABLE_DEVICES = ("cpu", "cuda", "mps", "xpu")


def _check_device(device: str) -> None:
    """UsageError for devices that hold no data or cannot run a model (``meta``, ``hpu`` without its backend...)."""
    kind = torch.device(device).type
    if kind not in _RUNNABLE_DEVICES:
        raise UsageError(f"--device {device} cannot run a model (it holds no data or has no backend here): use "
                         f"--device cpu or cuda")
    if kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"--device {device} asked for, but no XPU is available: use --device cpu")


def _check_limits(p: Plan) -> None:
    """Image size, image count and a memory estimate of one batch (``limits``; --allow_large skips them)."""
    o = p.opts
    limits.check_size(p.width, p.height, o.allow_large)
    per_iter = len(p.prompts) * o.repeat if o.from_file is not None else o.n_samples
    limits.check_count(per_iter * o.n_iter, o.allow_large)
    half = torch.device(o.device).type != "cpu" and (o.precision == "autocast" or o.bf16 or o.fast)
    needed = limits.estimate_bytes(p.config, p.geometry.factor, p.width, p.height, o.n_samples, o.scale != 1.0,
                                   2 if half else 4, o.tiled_vae, limits.file_bytes(p.source.ckpt_path))
    limits.check_memory(needed, o.device, o.allow_large,
                        f"a batch of {o.n_samples} image{'s' if o.n_samples != 1 else ''} of {p.width}x{p.height}")


def plan(opts: Options, default_dir: Optional[Path] = None) -> Plan:
    """Validate the whole run (files, config, sizes, prompts, init image, output folder, memory); loads no
    weights."""
    _check_device(opts.device)
    check_writable(opts.outdir)
    check_writable(opts.outdir / "samples")
    source = loading.resolve_source(opts.ckpt, opts.config, default_dir)
    config = loading.read_config(source.config_path, allow_unsafe=opts.unsafe_config)
    geometry = loading.model_geometry(config, source.config_path)
    check_geometry(opts, geometry)
    inpaint.check_mode(opts.mode, config, source)
    opts = inpaint.with_default_strength(opts, config)
    f = geometry.factor
    width = _valid_side("--W", opts.width, f) if opts.width is not None else None
    height = _valid_side("--H", opts.height, f) if opts.height is not None else None
    prompts = _prompts(opts, source)
    init_image = None
    if opts.mode == "img2img":
        init_image = pipeline.load_init_image(opts.init_img, f, width, height, opts.allow_large)
        width, height = init_image.size
    canvas = None
    if opts.mode == "inpaint":
        canvas = inpaint.plan_canvas(opts, opts.inpaint, f, width, height, geometry.native_pixels)
        width, height = canvas.size
    width = width or geometry.native_pixels
    height = height or geometry.native_pixels
    p = Plan(opts, source, config, geometry, width, height, prompts, init_image, canvas)
    _check_limits(p)
    return p


def _parameters(p: Plan, prompt: str, seed: int, model_hash: str) -> str:
    o = p.opts
    text = format_parameters(ImageParameters(
        prompt=prompt, negative_prompt=o.negative_prompt, steps=o.steps, sampler=o.sampler_label,
        schedule_type=o.sampler_choice.schedule_label if o.sampler_choice.schedule in USER_SCHEDULES else None,
        cfg_scale=o.scale, seed=seed, width=p.width, height=p.height, model=p.source.name, model_hash=model_hash,
        denoising_strength=o.strength if o.mode in ("img2img", "inpaint") else None,
        eta=o.eta if o.eta is not None and o.eta != o.sampler_choice.spec.eta else None,
        vae=o.vae.stem if o.vae is not None else None))
    return inpaint.add_settings(text, o.inpaint) if o.inpaint is not None else text


class _Generation:
    """The loaded pieces of a run and the per-batch work."""

    def __init__(self, p: Plan):
        o = p.opts
        self.plan = p
        self.model = loading.load_model(p.source, p.config, o.use_ema, o.vae, o.device)
        self.loras = LoraSession(self.model, o.loras, p.prompts)  # --lora merged; <lora:...> tags checked
        for applied in accel.apply_options(self.model, o):
            logger.info("speed option: %s", applied)
        self.checker = loading.load_checker(o.safety_checker, o.device) if o.safety_check else None
        self.model_hash = file_hash(p.source.ckpt_path)
        self.precision = pipeline.choose_precision(o.device, o.precision, o.bf16)
        self.sampler = o.sampler_choice
        self.shape = (p.geometry.channels, p.height // p.geometry.factor, p.width // p.geometry.factor)
        self.posterior = None
        self.warned: set = set()
        if o.mode == "img2img":
            with torch.no_grad(), self.precision.scope():
                init = pipeline.image_tensor(p.init_image, o.device)
                mean, std = pipeline.encode_init(self.model, init)
                self.posterior = (mean.float(), std.float())
            self.steps_per_image = pipeline.sampler_steps(self.model, self.sampler, o.steps, o.strength)
        elif o.mode == "inpaint":
            with torch.no_grad(), self.precision.scope():
                self.prepared = inpaint.prepare(self.model, p.canvas, inpaint.config_is_inpainting(p.config), o.device)
            self.steps_per_image = pipeline.sampler_steps(self.model, self.sampler, o.steps, o.strength)
        else:
            self.steps_per_image = pipeline.sampler_steps(self.model, self.sampler, o.steps)

    @torch.no_grad()
    def latents(self, job: pipeline.Job, callback: pipeline.StepCallback) -> torch.Tensor:
        """Sampled latents [B, C, h, w] of one job."""
        o = self.plan.opts
        job = self.loras.prepare_job(job)  # the LoRAs of its <lora:...> tags merged, the tags removed
        gens = pipeline.generators(job.seeds)
        with self.precision.scope():
            cond, uncond = pipeline.conditioning(self.model, job, o.negative_prompt, o.scale, self.warned)
            if o.mode == "img2img":
                return pipeline.sample_img2img(self.model, self.sampler, self.posterior, cond, uncond, o.steps,
                                               o.strength, o.scale, gens, o.eta, callback)
            if o.mode == "inpaint":
                return inpaint.sample_inpaint(self.model, self.sampler, self.prepared, cond, uncond, o.steps,
                                              o.strength, o.scale, gens, o.eta, callback)
            x_T = pipeline.draw(gens, self.shape, o.device)
            return pipeline.sample_txt2img(self.model, self.sampler, x_T, cond, uncond, o.steps, o.scale, gens, o.eta,
                                           callback)

    @torch.no_grad()
    def images(self, latents: torch.Tensor) -> tuple[list[Image.Image], list[bool]]:
        """Decoded, safety-checked PIL images of a batch and which of them were flagged."""
        images = pipeline.to_numpy(pipeline.decode(self.model, latents, self.precision))
        if self.plan.canvas is not None:  # pasted into the input through the blurred mask
            images = inpaint.to_array(inpaint.composite(self.prepared, numpy_to_pil(images)))
        flags = [False] * len(images)
        if self.checker is not None:
            images, flags = self.checker.check(images)
        return numpy_to_pil(images), list(flags)


def _save_batch(p: Plan, gen: _Generation, writer: OutputWriter, job: pipeline.Job, images: list[Image.Image],
                flags: list[bool], result: RunResult) -> Optional[str]:
    """Write a batch's images with their own parameters; returns the first image's parameters text."""
    first = None
    for image, prompt, seed, flagged in zip(images, job.prompts, job.seeds, flags):
        params = _parameters(p, prompt, seed, gen.model_hash)
        first = first or params
        path = writer.sample(image, params)
        if path is not None:
            result.samples.append(path)
        if flagged:
            logger.warning("image %s (seed %d) was flagged by the safety checker and replaced by a black image",
                           path or f"#{result.n_images}", seed)
        result.n_images += 1
    result.flagged += sum(flags)
    return first


def run(opts: Options, progress: ProgressFactory = no_progress, default_dir: Optional[Path] = None,
        result: Optional[RunResult] = None) -> RunResult:
    """Validate, load, generate every batch and write samples and grid; raises UsageError/CheckpointError first.

    ``result`` (optional) is filled in as images are saved, so a caller still knows what was written when the
    run stops early (Ctrl-C, a full disk, a NaN batch: ``limits.NonFiniteResult``).
    """
    p = plan(opts, default_dir)
    gen = _Generation(p)
    watermark = (opts.watermark_text or loading.default_watermark(p.geometry)) if opts.watermark else None
    writer = OutputWriter(opts.outdir, watermark, save_samples=not opts.skip_save, save_grid=not opts.skip_grid,
                          n_rows=opts.n_rows)
    jobs = pipeline.plan_jobs(p.prompts, opts.n_samples, opts.n_iter, opts.seed, opts.repeat, opts.fixed_code,
                              batch_of_copies=opts.from_file is None)
    result = result if result is not None else RunResult()
    grid_images, grid_params = [], None
    start = time.perf_counter()
    with progress(len(jobs), "batches") as batches:
        for job in jobs:
            steps = gen.steps_per_image
            with progress(steps, "sampling") as bar:
                latents = gen.latents(job, lambda i: bar.update(1))
            limits.check_finite(latents, "the sampled latents", gen.precision.reduced)
            images, flags = gen.images(latents)
            params = _save_batch(p, gen, writer, job, images, flags, result)
            if not opts.skip_grid:
                grid_images.extend(images)
                grid_params = grid_params or params
            batches.update(1)
    result.grid = writer.grid(grid_images, grid_params)
    result.seconds = time.perf_counter() - start
    return result

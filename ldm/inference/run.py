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

from ldm.inference import hires, inpaint, limits, loading, pipeline, sdxl_session
from ldm.inference.sdxl import is_sdxl_config
from ldm.inference.args import Options, read_prompts
from ldm.inference.errors import UsageError
from ldm.inference.outputs import OutputWriter, check_writable
from ldm.api import LoadedModel, Settings, Task, build
from ldm.api.generate import valid_side

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

    @property
    def out_size(self) -> tuple[int, int]:
        """(width, height) of the saved pictures: the hires fix's target, else the generated size."""
        if self.opts.hires is None:
            return self.width, self.height
        return hires.target_size(self.opts.hires, self.width, self.height, self.geometry.factor)


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
    width, height = p.out_size
    limits.check_size(width, height, o.allow_large)
    per_iter = len(p.prompts) * o.repeat if o.from_file is not None else o.n_samples
    limits.check_count(per_iter * o.n_iter, o.allow_large)
    half = torch.device(o.device).type != "cpu" and (o.precision == "autocast" or o.bf16 or o.fast)
    needed = limits.estimate_bytes(p.config, p.geometry.factor, width, height, o.n_samples, o.scale != 1.0,
                                   2 if half else 4, o.tiled_vae, limits.file_bytes(p.source.ckpt_path))
    limits.check_memory(needed, o.device, o.allow_large,
                        f"a batch of {o.n_samples} image{'s' if o.n_samples != 1 else ''} of {width}x{height}")


def plan(opts: Options, default_dir: Optional[Path] = None) -> Plan:
    """Validate the whole run (files, config, sizes, prompts, init image, output folder, memory); loads no
    weights."""
    _check_device(opts.device)
    check_writable(opts.outdir)
    check_writable(opts.outdir / "samples")
    source = loading.resolve_source(opts.ckpt, opts.config, default_dir)
    config = loading.read_config(source.config_path, allow_unsafe=opts.unsafe_config)
    opts = sdxl_session.plan_options(opts, config, source.ckpt_path)  # SDXL: its sampler, checkpoint roles
    geometry = loading.model_geometry(config, source.config_path)
    check_geometry(opts, geometry)
    inpaint.check_mode(opts.mode, config, source)
    if opts.hires is not None and is_sdxl_config(config):
        raise UsageError("the hires fix (--hires) is for SD 1/2 models; SDXL generates at 1024 pixels: drop --hires")
    opts = inpaint.with_default_strength(opts, config)
    f = geometry.factor
    width = valid_side("--W", opts.width, f) if opts.width is not None else None
    height = valid_side("--H", opts.height, f) if opts.height is not None else None
    prompts = _prompts(opts, source)
    init_image = None
    if opts.mode == "img2img":
        init_image = pipeline.load_init_image(opts.init_img, f, width, height, opts.allow_large, opts.resize_mode)
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


def load(p: Plan) -> LoadedModel:
    """Load the planned model once (``ldm.api``: weights, LoRAs, speed options, safety checker, precision)."""
    o = p.opts
    return build(p.source, p.config, p.geometry, device=o.device, use_ema=o.use_ema, vae=o.vae, loras=o.loras,
                 prompts=p.prompts, precision=o.precision, bf16=o.bf16, safety_check=o.safety_check,
                 safety_checker=o.safety_checker, speed=o)


def settings(p: Plan) -> Settings:
    """The API's settings of a planned run."""
    o = p.opts
    return Settings(o.mode, o.negative_prompt, o.steps, o.sampler_choice, o.scale, p.width, p.height, eta=o.eta,
                    strength=o.strength, init_image=p.init_image, canvas=p.canvas, inpaint=o.inpaint,
                    sdxl=o.sdxl, clip_skip=o.clip_skip, hires=o.hires)


def _save_batch(task: Task, writer: OutputWriter, job: pipeline.Job, images: list[Image.Image],
                flags: list[bool], result: RunResult) -> Optional[str]:
    """Write a batch's images with their own parameters; returns the first image's parameters text."""
    first = None
    for image, prompt, seed, flagged in zip(images, job.prompts, job.seeds, flags):
        params = task.parameters(prompt, seed)
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
    gen = Task(load(p), settings(p))
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
            limits.check_finite(latents, "the sampled latents", gen.m.precision.reduced)
            images, flags = gen.images(latents)
            params = _save_batch(gen, writer, job, images, flags, result)
            if not opts.skip_grid:
                grid_images.extend(images)
                grid_params = grid_params or params
            batches.update(1)
    result.grid = writer.grid(grid_images, grid_params)
    result.seconds = time.perf_counter() - start
    return result

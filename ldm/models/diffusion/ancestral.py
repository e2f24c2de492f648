"""Ancestral DDPM sampling (``p_sample`` loop) with the model's own variance, and a front end for DDPM models.

:func:`p_sample_loop` draws ``x_{i-1} ~ N(mean, var)`` of :meth:`DiffusionProcess.reverse_step` at every index of a
:class:`DiffusionSchedule` (a model's full schedule or a respaced subset, Improved DDPM style): fixed small/large
or learned variances alike. :func:`sample_model` runs it, or DDIM over a respaced subset, for a DDPM /
LatentDiffusion with classifier-free guidance. Guidance acts on the mean half of the output only; the variance
half of learned-variance models is taken from the conditional pass.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

import torch

from ldm.models.diffusion.denoiser import ModelDenoiser
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.models.diffusion.process import DiffusionSchedule
from ldm.models.diffusion.variance import split_output
from ldm.modules.diffusionmodules.schedules import space_timesteps
from ldm.samplers.denoiser import SigmaDenoiser
from ldm.samplers.noise import gaussian_noise, randn_like
from ldm.samplers.original import sample_ddim
from ldm.samplers.schedules import respaced_sigmas
from ldm.samplers.steps import StepInfo

logger = logging.getLogger(__name__)

Intermediates = dict[str, list[torch.Tensor]]


def progress_iter(items: Iterable[int], enabled: bool, desc: str, total: int) -> Iterable[int]:
    """``items`` wrapped in a tqdm progress bar when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return items
    return tqdm(items, desc=desc, total=total)


def p_sample(schedule: DiffusionSchedule, denoiser: Callable[..., torch.Tensor], x: torch.Tensor, index: int,
             cond: Any, clip_denoised: bool = False, generator: torch.Generator | None = None,
             temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_{index-1}, predicted x0) [B, C, ...] from x at schedule ``index``; no noise is added at index 0.

    ``denoiser(x, t, cond)`` returns the raw output at the network's timestep ``schedule.timesteps[index]``,
    with the variance half when the schedule's variance type is learned.
    """
    t = torch.full((x.shape[0],), index, dtype=torch.long, device=x.device)
    out = denoiser(x, schedule.timesteps.to(x.device)[t], cond)
    mean_out, var_values = split_output(out, schedule.model_var_type, x.shape[1])
    step = schedule.reverse_step(mean_out, var_values, x, t, clip_denoised)
    if index == 0:
        return step.mean, step.pred_x0
    noise = randn_like(x, generator) * temperature
    return step.mean + torch.exp(0.5 * step.log_variance) * noise, step.pred_x0


def p_sample_loop(schedule: DiffusionSchedule, denoiser: Callable[..., torch.Tensor], x_T: torch.Tensor,
                  cond: Any = None, *, clip_denoised: bool = False, generator: torch.Generator | None = None,
                  log_every_t: int = 100, progress: bool = False, callback: Callable[[int], Any] | None = None,
                  temperature: float = 1.0) -> tuple[torch.Tensor, Intermediates]:
    """Ancestral sampling from x_T [B, C, ...] down to x_0; returns (x_0, {"x_inter": [...], "pred_x0": [...]}).

    Intermediates start with x_T and are logged at every index divisible by ``log_every_t`` and at the first step.
    """
    x, last = x_T, schedule.num_timesteps - 1
    inter: Intermediates = {"x_inter": [x], "pred_x0": [x]}
    for i, index in enumerate(progress_iter(range(last, -1, -1), progress, "DDPM Sampler", last + 1)):
        x, pred_x0 = p_sample(schedule, denoiser, x, index, cond, clip_denoised, generator, temperature)
        if callback is not None:
            callback(i)
        if index % log_every_t == 0 or index == last:
            inter["x_inter"].append(x)
            inter["pred_x0"].append(pred_x0)
    return x, inter


@torch.no_grad()
def sample_model(model: Any, x_T: torch.Tensor, cond: Any = None, *, method: str = "ancestral",
                 steps: int | str | None = None, eta: float = 0.0, uncond: Any = None, guidance_scale: float = 1.0,
                 clip_denoised: bool | None = None, generator: torch.Generator | None = None,
                 progress: bool = False, frames: int = 10) -> tuple[torch.Tensor, Intermediates]:
    """Samples [B, C, ...] of a DDPM / LatentDiffusion from x_T, by ``method`` "ancestral" or "ddim".

    ``steps``: None (ancestral: every timestep; DDIM: 50) or a :func:`space_timesteps` spec ("250", "ddim25",
    "10,10,5") of the respaced subset. ``clip_denoised`` defaults to the model's (True for pixel DDPMs).
    ``frames`` ~ number of intermediate frames logged.
    """
    clip = getattr(model, "clip_denoised", False) if clip_denoised is None else clip_denoised
    full = DiffusionSchedule.from_model(model)
    spec = steps if steps is not None else (full.num_timesteps if method == "ancestral" else 50)
    use = space_timesteps(full.num_timesteps, spec if isinstance(spec, str) else int(spec))
    if method == "ancestral":
        schedule = full if len(use) == full.num_timesteps else full.respaced(use)
        guided = ClassifierFreeGuidance(ModelDenoiser(model, full_output=True), uncond, guidance_scale,
                                        guided_channels=x_T.shape[1])
        every = max(1, schedule.num_timesteps // max(frames, 1))
        logger.info("ancestral sampling over %d steps (%s variance)", len(use), schedule.model_var_type.value)
        return p_sample_loop(schedule, guided, x_T, cond, clip_denoised=clip, generator=generator,
                             log_every_t=every, progress=progress)
    if method != "ddim":
        raise ValueError(f"unknown sampling method '{method}'; choose ancestral or ddim")
    sigmas = respaced_sigmas(full.alphas_cumprod, use)
    denoiser = SigmaDenoiser(ClassifierFreeGuidance(ModelDenoiser(model), uncond, guidance_scale))
    denoised_fn = (lambda x0: x0.clamp(-1.0, 1.0)) if clip else None
    every = max(1, len(use) // max(frames, 1))
    inter: Intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}

    def log(info: StepInfo) -> None:
        index = info.total - 1 - info.i
        if index % every == 0 or index == info.total - 1:
            inter["x_inter"].append(info.x / (1.0 + info.sigma_next ** 2) ** 0.5)
            inter["pred_x0"].append(info.denoised)

    logger.info("DDIM sampling over %d respaced steps, eta %g", len(use), eta)
    s0 = float(sigmas[0])
    bar = iter(progress_iter(range(len(use)), progress, "DDIM Sampler", len(use)))
    x = sample_ddim(denoiser.bind(cond), x_T * (1.0 + s0 * s0) ** 0.5, sigmas,
                    callback=lambda info: (log(info), next(bar, None)),
                    noise=gaussian_noise(x_T, generator), eta=eta, denoised_fn=denoised_fn)
    return x, inter

"""The original sampler classes' API (``DDIMSampler(model).sample(S, batch_size, shape, ...)``) over the sampler
functions, for code and configs that use the original import paths. New code calls :func:`ldm.samplers.sample`.

The original hooks map onto the functions: guidance wraps the model (one batched pass); ``ucg_schedule`` picks
the scale per step; ``dynamic_threshold`` / ``quantize_x0`` post-process the x0 estimate; ``score_corrector``
corrects eps; ``temperature`` / ``noise_dropout`` shape the fresh noise; ``mask`` (1 = keep) with ``x0`` keeps
the known region by blending the denoised estimate (as the web UI inpaints), not by re-noising x.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.denoiser import ModelDenoiser
from ldm.modules.diffusionmodules.schedules import make_ddim_sampling_parameters, make_ddim_timesteps
from ldm.samplers.denoiser import DenoiseFn, guided, masked
from ldm.samplers.noise import gaussian_noise, scaled_noise
from ldm.samplers.schedules import ddim_grid, respaced_sigmas
from ldm.samplers.steps import StepInfo

logger = logging.getLogger(__name__)

Intermediates = dict[str, list[torch.Tensor]]


def conditioning_batch_size(conditioning: Any) -> Optional[int]:
    """Batch size of a tensor / list / dict conditioning (first entry), or None when it has none."""
    c = conditioning
    while isinstance(c, (dict, list, tuple)) and len(c) > 0:
        c = next(iter(c.values())) if isinstance(c, dict) else c[0]
    return int(c.shape[0]) if torch.is_tensor(c) else None


def norm_thresholding(x0: torch.Tensor, value: float) -> torch.Tensor:
    """Rescale each sample of x0 [B, ...] so its RMS is at most ``value`` (the original's dynamic threshold)."""
    rms = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / rms.reshape(-1, *((1,) * (x0.dim() - 1))))


class OriginalSampler:
    """Shared part of ``DDIMSampler`` / ``PLMSSampler`` / ``DPMSolverSampler``: one model, many ``sample`` calls."""

    name = "DDIM"

    def __init__(self, model: Any, schedule: str = "linear", device: torch.device | str | None = None,
                 **kwargs: Any) -> None:
        self.model = model
        self.denoiser = ModelDenoiser(model)
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule = schedule
        self.device = torch.device(device) if device is not None else self.denoiser.alphas_cumprod.device
        self.ddim_timesteps: Optional[np.ndarray] = None
        if kwargs:
            logger.debug("%s ignores the arguments %s", type(self).__name__, sorted(kwargs))

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Choose the timesteps (``ddim_timesteps``) and the original's per-step arrays (``ddim_alphas``, ...)."""
        acp = self.denoiser.alphas_cumprod.cpu().numpy().astype(np.float32)
        if acp.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(f"the model's alphas_cumprod has {acp.shape[0]} entries but num_timesteps is "
                             f"{self.ddpm_num_timesteps}")
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, len(acp), verbose=verbose)
        sigmas, alphas, prev = make_ddim_sampling_parameters(acp, self.ddim_timesteps, ddim_eta, verbose=verbose)
        self.ddim_sigmas, self.ddim_alphas = np.asarray(sigmas, dtype=np.float64), alphas
        self.ddim_alphas_prev, self.ddim_sqrt_one_minus_alphas = prev, np.sqrt(1.0 - alphas)
        self.alphas_cumprod = torch.as_tensor(acp)
        self.ddim_eta = float(ddim_eta)

    def grid(self, use_original_steps: bool = False) -> torch.Tensor:
        """The sigma levels of the chosen timesteps, descending, then sigma_0 (every timestep, then 0, with
        ``use_original_steps``)."""
        acp = self.denoiser.alphas_cumprod
        if use_original_steps:
            return respaced_sigmas(acp, range(len(acp)))
        if self.ddim_timesteps is None:
            raise RuntimeError(f"call {type(self).__name__}.make_schedule(ddim_num_steps=...) first")
        return ddim_grid(acp, self.ddim_timesteps)

    def model_fn(self, cond: Any, scale: float, uncond: Any, sigmas: torch.Tensor,
                 ucg_schedule: Optional[Sequence[float]] = None, score_corrector: Any = None,
                 corrector_kwargs: Optional[dict] = None) -> DenoiseFn:
        """D(x, sigma) of the guided model, with the per-step scales and the score corrector if given."""
        base = guided(self.denoiser, uncond, scale)
        if ucg_schedule is not None:
            steps = {float(s): i for i, s in enumerate(sigmas[:-1])}
            per_step = [guided(self.denoiser, uncond, g) for g in ucg_schedule]
            fn: DenoiseFn = lambda x, s: per_step[steps.get(float(s[0]), 0)](x, s, cond)  # noqa: E731
        else:
            fn = base.bind(cond)
        if score_corrector is None:
            return fn
        kw = corrector_kwargs or {}

        def corrected(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            s = sigma.to(x.dtype).reshape(-1, *((1,) * (x.dim() - 1)))
            eps = (x - fn(x, sigma)) / s
            x_vp = x / (s * s + 1).sqrt()
            eps = score_corrector.modify_score(self.model, eps, x_vp, base.timestep(sigma), cond, **kw)
            return x - s * eps
        return corrected

    def denoised_fn(self, quantize_x0: bool,
                    dynamic_threshold: Optional[float]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
        """Post-processing of the x0 estimate (VQ quantisation, RMS threshold), or None."""
        if not quantize_x0 and dynamic_threshold is None:
            return None
        if quantize_x0 and not hasattr(getattr(self.model, "first_stage_model", None), "quantize"):
            raise ValueError("quantize_x0 needs a first stage model with a 'quantize' method (a VQ model)")

        def post(x0: torch.Tensor) -> torch.Tensor:
            if quantize_x0:
                x0 = self.model.first_stage_model.quantize(x0)[0]
            return norm_thresholding(x0, dynamic_threshold) if dynamic_threshold is not None else x0
        return post

    def run(self, sigmas: torch.Tensor, x: torch.Tensor, model: DenoiseFn, kwargs: dict,
            callback: Optional[Callable[[int], Any]] = None,
            img_callback: Optional[Callable[[torch.Tensor, int], Any]] = None,
            log_every_t: int = 100) -> tuple[torch.Tensor, Intermediates]:
        """Run this class's sampler function from the DDPM sample x [B, ...] at sigmas[0]; returns the DDPM
        sample at sigmas[-1] and the intermediates logged every ``log_every_t`` grid indices."""
        to_vp = lambda v, s: v / math.sqrt(1.0 + float(s) ** 2)  # noqa: E731
        inter: Intermediates = {"x_inter": [x], "pred_x0": [x]}
        total = len(sigmas) - 1

        def on_step(info: StepInfo) -> None:
            index = total - 1 - info.i
            if callback is not None:
                callback(info.i)
            if img_callback is not None:
                img_callback(info.denoised, info.i)
            if index % log_every_t == 0 or index == total - 1:
                inter["x_inter"].append(to_vp(info.x, info.sigma_next))
                inter["pred_x0"].append(info.denoised)

        s0 = float(sigmas[0])
        out = self.function(model, x * math.sqrt(1.0 + s0 * s0), sigmas, callback=on_step, **kwargs)
        return to_vp(out, sigmas[-1]), inter

    @staticmethod
    def function(*args: Any, **kwargs: Any) -> torch.Tensor:
        """The sampler function this class runs."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable[[int], Any]] = None, normals_sequence: Any = None,
               img_callback: Optional[Callable[[torch.Tensor, int], Any]] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Optional[dict] = None, verbose: bool = True, x_T: Optional[torch.Tensor] = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, dynamic_threshold: Optional[float] = None,
               ucg_schedule: Optional[Sequence[float]] = None, generator: Optional[torch.Generator] = None,
               **kwargs: Any) -> tuple[torch.Tensor, Intermediates]:
        """Sample [batch_size, *shape] in ``S`` steps; returns (samples, {"x_inter", "pred_x0"})."""
        options = self.check_options(eta, mask, score_corrector, quantize_x0, kwargs)
        cbs = conditioning_batch_size(conditioning)
        if cbs is not None and cbs != batch_size:
            logger.warning("got %d conditionings for a batch of %d", cbs, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        sigmas = self.grid_for_sampling(S, options)
        if ucg_schedule is not None and len(ucg_schedule) != len(sigmas) - 1:
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales for {len(sigmas) - 1} sampling steps")
        x = x_T if x_T is not None else torch.randn((batch_size, *shape), generator=generator,
                                                    device=generator.device if generator else self.device)
        x = x.to(self.device)
        model = self.model_fn(conditioning, unconditional_guidance_scale, unconditional_conditioning, sigmas,
                              ucg_schedule, score_corrector, corrector_kwargs)
        if mask is not None:
            if x0 is None:
                raise ValueError("a mask needs x0, the known latents to keep")
            model = masked(model, x0, mask)
        if verbose:
            logger.info("Running %s sampling with %d timesteps", self.name, len(sigmas) - 1)
        fn_kwargs = self.function_kwargs(x, eta, temperature, noise_dropout, generator, quantize_x0,
                                         dynamic_threshold, options)
        return self.run(sigmas, x, model, fn_kwargs, callback, img_callback, log_every_t)

    def check_options(self, eta: float, mask: Any, score_corrector: Any, quantize_x0: bool,
                      kwargs: dict) -> dict:
        """Refuse what this sampler cannot do; returns the sampler-specific options found in ``kwargs``."""
        if kwargs:
            logger.debug("%s.sample ignores the arguments %s", type(self).__name__, sorted(kwargs))
        return {}

    def grid_for_sampling(self, steps: int, options: dict) -> torch.Tensor:
        """The sigmas a ``sample`` call runs over (the DDIM grid of the last ``make_schedule``)."""
        return self.grid()

    def function_kwargs(self, x: torch.Tensor, eta: float, temperature: float, noise_dropout: float,
                        generator: Optional[torch.Generator], quantize_x0: bool, dynamic_threshold: Optional[float],
                        options: dict) -> dict:
        """Keyword arguments of this class's sampler function."""
        return {"noise": scaled_noise(gaussian_noise(x, generator), temperature, noise_dropout), "eta": eta,
                "denoised_fn": self.denoised_fn(quantize_x0, dynamic_threshold)}


__all__ = ["OriginalSampler", "conditioning_batch_size", "norm_thresholding"]

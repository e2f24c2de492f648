"""The original sampler classes' public surface (constructor, ``make_schedule``, ``sample``) as a thin adapter.

``DDIMSampler`` and ``PLMSSampler`` subclass :class:`GridSampler` and differ only in their step class; all the
maths lives in :mod:`ldm.models.diffusion.sampling`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch

from ldm.models.diffusion.denoiser import ModelDenoiser
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.models.diffusion.sampling import DDIMGrid, DDIMStep, norm_thresholding, randn, sample_grid

logger = logging.getLogger(__name__)


def conditioning_batch_size(conditioning: Any) -> int | None:
    """Batch size of a tensor / list / dict conditioning (first entry), or None when it has none."""
    c = conditioning
    while isinstance(c, (dict, list, tuple)) and len(c) > 0:
        c = next(iter(c.values())) if isinstance(c, dict) else c[0]
    return int(c.shape[0]) if torch.is_tensor(c) else None


def full_schedule_tensors(alphas_cumprod: torch.Tensor, eta: float) -> dict[str, torch.Tensor]:
    """The DDPM-grid tensors the original samplers expose (float32, computed in float64 from alpha_bar [T])."""
    acp = alphas_cumprod.detach().double()
    prev = torch.cat([acp.new_ones(1), acp[:-1]])
    sigmas = eta * torch.sqrt((1 - prev) / (1 - acp) * (1 - acp / prev))
    out = {
        "alphas_cumprod": acp, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": acp.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - acp).sqrt(), "log_one_minus_alphas_cumprod": (1.0 - acp).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / acp).sqrt(), "sqrt_recipm1_alphas_cumprod": (1.0 / acp - 1).sqrt(),
        "ddim_sigmas_for_original_num_steps": torch.nan_to_num(sigmas),
    }
    return {k: v.float() for k, v in out.items()}


class GridSampler:
    """Adapter from the original sampler API to the sampling functions (one model, many ``sample`` calls)."""

    step_class: type[DDIMStep] = DDIMStep
    name = "DDIM"

    def __init__(self, model: Any, schedule: str = "linear", device: torch.device | str | None = None,
                 **kwargs: Any) -> None:
        self.model = model
        self.denoiser = ModelDenoiser(model)
        self.ddpm_num_timesteps = int(model.num_timesteps)
        self.schedule = schedule
        self._device = torch.device(device) if device is not None else None
        self.grid: DDIMGrid | None = None
        self.ddim_eta = 0.0
        if kwargs:
            logger.debug("%s ignores the arguments %s", type(self).__name__, sorted(kwargs))

    @property
    def device(self) -> torch.device:
        """Where fresh noise is drawn: the device given to the constructor, else the model's current device."""
        return self._device if self._device is not None else self.denoiser.alphas_cumprod.device

    @device.setter
    def device(self, value: torch.device | str | None) -> None:
        self._device = torch.device(value) if value is not None else None

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Choose the timesteps and per-step scalars (``ddim_timesteps``, ``ddim_alphas``, ... as numpy)."""
        acp = self.denoiser.alphas_cumprod
        if acp.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(f"the model's alphas_cumprod has {acp.shape[0]} entries but num_timesteps is "
                             f"{self.ddpm_num_timesteps}")
        grid = DDIMGrid.make(acp, ddim_num_steps, ddim_eta, ddim_discretize, verbose=verbose)
        self.grid, self.ddim_eta = grid, float(ddim_eta)
        self.ddim_timesteps = grid.timesteps
        self.ddim_alphas, self.ddim_alphas_prev = grid.alphas, grid.alphas_prev
        self.ddim_sigmas, self.ddim_sqrt_one_minus_alphas = grid.sigmas, grid.sqrt_one_minus_alphas
        for name, value in full_schedule_tensors(acp, ddim_eta).items():
            setattr(self, name, value.to(self.device))

    def grid_for(self, use_original_steps: bool = False) -> DDIMGrid:
        """The DDIM grid of the last ``make_schedule``, or every DDPM timestep with ``use_original_steps``."""
        if use_original_steps:
            return DDIMGrid.full(self.denoiser.alphas_cumprod, self.ddim_eta)
        if self.grid is None:
            raise RuntimeError(f"call {type(self).__name__}.make_schedule(ddim_num_steps=...) first")
        return self.grid

    def make_step(self, grid: DDIMGrid, unconditional_guidance_scale: float = 1.0,
                  unconditional_conditioning: Any = None, *, temperature: float = 1.0, noise_dropout: float = 0.0,
                  score_corrector: Any = None, corrector_kwargs: dict | None = None, quantize_x0: bool = False,
                  dynamic_threshold: float | None = None, ucg_schedule: Sequence[float] | None = None,
                  generator: torch.Generator | None = None) -> DDIMStep:
        """A step object of this sampler's kind with guidance and the original's optional hooks."""
        corrector = None
        if score_corrector is not None:
            kw = corrector_kwargs or {}
            corrector = lambda e, x, t, c: score_corrector.modify_score(self.model, e, x, t, c, **kw)  # noqa: E731
        return self.step_class(
            ClassifierFreeGuidance(self.denoiser, unconditional_conditioning, unconditional_guidance_scale), grid,
            temperature=temperature, noise_dropout=noise_dropout, score_corrector=corrector,
            denoised_fn=self._denoised_fn(quantize_x0, dynamic_threshold), generator=generator,
            guidance_scales=ucg_schedule)

    def _denoised_fn(self, quantize_x0: bool,
                     dynamic_threshold: float | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not quantize_x0 and dynamic_threshold is None:
            return None
        if quantize_x0 and not hasattr(getattr(self.model, "first_stage_model", None), "quantize"):
            raise ValueError("quantize_x0 needs a first stage model with a 'quantize' method (a VQ model)")

        def denoised(x0: torch.Tensor) -> torch.Tensor:
            if quantize_x0:
                x0 = self.model.first_stage_model.quantize(x0)[0]
            if dynamic_threshold is not None:
                x0 = norm_thresholding(x0, dynamic_threshold)
            return x0
        return denoised

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Callable[[int], Any] | None = None, normals_sequence: Any = None,
               img_callback: Callable[[torch.Tensor, int], Any] | None = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: dict | None = None, verbose: bool = True, x_T: torch.Tensor | None = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, dynamic_threshold: float | None = None,
               ucg_schedule: Sequence[float] | None = None, generator: torch.Generator | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample [batch_size, *shape] in ``S`` steps; returns (samples, {"x_inter", "pred_x0"})."""
        if kwargs:
            logger.debug("%s.sample ignores the arguments %s", type(self).__name__, sorted(kwargs))
        cbs = conditioning_batch_size(conditioning)
        if cbs is not None and cbs != batch_size:
            logger.warning("got %d conditionings for a batch of %d", cbs, batch_size)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        grid = self.grid_for()
        if ucg_schedule is not None and len(ucg_schedule) != len(grid):
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales for {len(grid)} sampling steps")
        size = (batch_size, *shape)
        x = x_T if x_T is not None else randn(size, self.device, generator=generator)
        if verbose:
            logger.info("Running %s sampling with %d timesteps", self.name, len(grid))
        step = self.make_step(grid, unconditional_guidance_scale, unconditional_conditioning,
                              temperature=temperature, noise_dropout=noise_dropout, score_corrector=score_corrector,
                              corrector_kwargs=corrector_kwargs, quantize_x0=quantize_x0,
                              dynamic_threshold=dynamic_threshold, ucg_schedule=ucg_schedule, generator=generator)
        return sample_grid(step, x, conditioning, grid, mask=mask, x0=x0, callback=callback,
                           img_callback=img_callback, log_every_t=log_every_t, generator=generator,
                           progress=verbose, desc=f"{self.name} Sampler")

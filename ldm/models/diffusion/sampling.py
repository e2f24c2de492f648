"""DDIM-family sampling as small pieces over a :class:`~ldm.models.diffusion.denoiser.Denoiser`.

* :class:`DDIMGrid`: the timesteps a sampler visits and its per-step scalars (the original's ``ddim_*`` arrays).
* :class:`DDIMStep`: one DDIM update ``x_t -> x_{t-1}`` (eta through the grid's sigmas).
* :class:`PLMSStep`: the same update fed with a pseudo linear multistep eps (Liu et al. 2022).
* :func:`sample_grid`: the loop over the grid (masking, callbacks, intermediates).

Random draws go through :func:`randn`: with a ``torch.Generator`` they are reproducible on any device; without
one they are plain ``torch.randn`` calls, one per step at the point where the original draws (even when the
draw is multiplied by a zero sigma).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm.models.diffusion.parameterization import Prediction, split_prediction
from ldm.modules.diffusionmodules.schedules import make_ddim_sampling_parameters, make_ddim_timesteps

logger = logging.getLogger(__name__)

Callback = Callable[[int], Any]
ImageCallback = Callable[[torch.Tensor, int], Any]
ScoreCorrector = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


def randn(shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32,
          generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal draw of ``shape``; with a generator drawn on the generator's device, then moved."""
    if generator is None:
        return torch.randn(tuple(shape), device=device, dtype=dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device, dtype=dtype)
    return noise.to(device)


def randn_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal draw shaped like ``x`` (its device and dtype)."""
    return randn(x.shape, x.device, x.dtype, generator)


def _as_numpy32(alphas_cumprod: torch.Tensor | np.ndarray) -> np.ndarray:
    if torch.is_tensor(alphas_cumprod):
        alphas_cumprod = alphas_cumprod.detach().float().cpu().numpy()
    return np.asarray(alphas_cumprod, dtype=np.float32)


@dataclass(frozen=True)
class DDIMGrid:
    """Visited DDPM timesteps (ascending) and the per-step scalars; index i <-> ``timesteps[i]``.

    Dtypes as the original's sampler attributes: alphas and sqrt_one_minus_alphas float32 (alpha_bar
    buffer values), alphas_prev and sigmas float64.
    """

    timesteps: np.ndarray
    alphas: np.ndarray
    alphas_prev: np.ndarray
    sigmas: np.ndarray
    sqrt_one_minus_alphas: np.ndarray

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor | np.ndarray, num_steps: int, eta: float = 0.0,
             discretize: str = "uniform", verbose: bool = False) -> "DDIMGrid":
        """The DDIM grid of ``num_steps`` steps over the schedule ``alphas_cumprod`` [T] (float32 values)."""
        acp = _as_numpy32(alphas_cumprod)
        timesteps = make_ddim_timesteps(discretize, num_steps, len(acp), verbose=verbose)
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(acp, timesteps, eta, verbose=verbose)
        return cls(timesteps, alphas, alphas_prev, np.asarray(sigmas, dtype=np.float64), np.sqrt(1.0 - alphas))

    @classmethod
    def from_timesteps(cls, alphas_cumprod: torch.Tensor | np.ndarray, timesteps: Sequence[int],
                       eta: float = 0.0) -> "DDIMGrid":
        """A grid over any subset of timesteps (e.g. :func:`space_timesteps`); below the first is clean data.

        As Improved DDPM's respaced DDIM: alphas_prev[0] = 1, so the last step lands on x_0 itself.
        """
        acp = _as_numpy32(alphas_cumprod)
        ts = np.asarray(sorted({int(t) for t in timesteps}), dtype=np.int64)
        if len(ts) == 0 or ts[0] < 0 or ts[-1] >= len(acp):
            raise ValueError(f"DDIM timesteps must be a non-empty subset of [0, {len(acp) - 1}]")
        alphas = acp[ts]
        prev = np.append(np.float32(1.0), alphas[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            sigmas = eta * np.sqrt((1 - prev) / (1 - alphas) * (1 - alphas / prev))
        return cls(ts, alphas, prev, np.nan_to_num(sigmas).astype(np.float64), np.sqrt(1.0 - alphas))

    @classmethod
    def full(cls, alphas_cumprod: torch.Tensor | np.ndarray, eta: float = 0.0) -> "DDIMGrid":
        """Every DDPM timestep (the original's ``use_original_steps``); alphas_prev[0] is 1 there."""
        acp = _as_numpy32(alphas_cumprod)
        prev = np.append(np.float32(1.0), acp[:-1])
        with np.errstate(divide="ignore", invalid="ignore"):
            sigmas = eta * np.sqrt((1 - prev) / (1 - acp) * (1 - acp / prev))
        return cls(np.arange(len(acp), dtype=np.int64), acp, prev, np.nan_to_num(sigmas), np.sqrt(1.0 - acp))

    def __len__(self) -> int:
        return len(self.timesteps)

    def scalars(self, index: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(a_t, a_prev, sigma_t, sqrt(1 - a_t)) at ``index`` as float32 tensors broadcastable on ``like``."""
        shape = (1,) * like.dim()
        return tuple(torch.full(shape, float(arr[index]), dtype=torch.float32, device=like.device)
                     for arr in (self.alphas, self.alphas_prev, self.sigmas, self.sqrt_one_minus_alphas))


class DDIMStep:
    """One DDIM update ``x_t -> x_prev`` on a grid, from the (guided) raw output of ``denoiser``.

    ``pred_x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t)``, ``x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - s^2) e
    + s * noise``; v-models convert their output with the same a_t. ``denoised_fn`` may post-process pred_x0.
    """

    def __init__(self, denoiser: Any, grid: DDIMGrid, *, temperature: float = 1.0, noise_dropout: float = 0.0,
                 score_corrector: ScoreCorrector | None = None,
                 denoised_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 generator: torch.Generator | None = None, guidance_scales: Sequence[float] | None = None) -> None:
        self.denoiser, self.grid = denoiser, grid
        self.temperature, self.noise_dropout = temperature, noise_dropout
        self.score_corrector, self.denoised_fn = score_corrector, denoised_fn
        self.generator, self.guidance_scales = generator, guidance_scales

    def model_eps(self, x: torch.Tensor, t: torch.Tensor, index: int, i: int,
                  cond: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(eps, x0 or None) of the model at x [B, ...], timestep t [B] (grid ``index``, loop step ``i``)."""
        fn = self.denoiser
        if self.guidance_scales is not None:
            fn = fn.with_scale(self.guidance_scales[i])
        out = fn(x, t, cond)
        a_t, _, _, sqrt_one_minus_at = self.grid.scalars(index, x)
        e_t, x0 = split_prediction(out, x, a_t.sqrt(), sqrt_one_minus_at, Prediction(self.denoiser.prediction))
        if self.score_corrector is not None:
            e_t, x0 = self.score_corrector(e_t, x, t, cond), None
        return e_t, x0

    def update(self, x: torch.Tensor, e_t: torch.Tensor, index: int,
               pred_x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_prev, pred_x0) [B, ...] of the DDIM update with eps ``e_t``; draws one noise tensor."""
        a_t, a_prev, sigma_t, sqrt_one_minus_at = self.grid.scalars(index, x)
        if pred_x0 is None:
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        if self.denoised_fn is not None:
            pred_x0 = self.denoised_fn(pred_x0)
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * randn_like(x, self.generator) * self.temperature
        if self.noise_dropout > 0.0:
            noise = F.dropout(noise, p=self.noise_dropout)
        return a_prev.sqrt() * pred_x0 + dir_xt + noise, pred_x0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: int, i: int,
                 cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_prev, pred_x0) from x at timestep t [B] = grid ``index``."""
        e_t, x0 = self.model_eps(x, t, index, i, cond)
        return self.update(x, e_t, index, x0)


def adams_bashforth(e_t: torch.Tensor, old_eps: Sequence[torch.Tensor]) -> torch.Tensor:
    """Linear multistep eps of order len(old_eps) + 1 (2 to 4) from the current and the previous eps."""
    if len(old_eps) == 1:
        return (3 * e_t - old_eps[-1]) / 2
    if len(old_eps) == 2:
        return (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
    return (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24


class PLMSStep(DDIMStep):
    """PLMS: the DDIM update with a multistep eps; the first step is a pseudo improved Euler (2 model calls).

    ``last_eps`` holds the raw eps of the latest step (what enters the history).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.old_eps: list[torch.Tensor] = []
        self.last_eps: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, t: torch.Tensor, index: int, i: int,
                 cond: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_prev, pred_x0) from x at timestep t [B] = grid ``index``."""
        e_t, _ = self.model_eps(x, t, index, i, cond)
        if not self.old_eps:
            x_mid, _ = self.update(x, e_t, index)
            next_index = max(index - 1, 0)
            t_next = torch.full_like(t, int(self.grid.timesteps[next_index]))
            e_next, _ = self.model_eps(x_mid, t_next, next_index, i, cond)
            e_prime = (e_t + e_next) / 2
        else:
            e_prime = adams_bashforth(e_t, self.old_eps)
        x_prev, pred_x0 = self.update(x, e_prime, index)
        self.old_eps = (self.old_eps + [e_t])[-3:]
        self.last_eps = e_t
        return x_prev, pred_x0


def progress_iter(items: Iterable[int], enabled: bool, desc: str, total: int) -> Iterable[int]:
    """``items`` wrapped in a tqdm progress bar when ``enabled`` (and tqdm is installed)."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm is optional
        return items
    return tqdm(items, desc=desc, total=total)


def sample_grid(step: DDIMStep, x: torch.Tensor, cond: Any, grid: DDIMGrid, *, t_start: int | None = None,
                mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
                callback: Callback | None = None, img_callback: ImageCallback | None = None,
                log_every_t: int = 100, generator: torch.Generator | None = None, progress: bool = False,
                desc: str = "Sampling") -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Run ``step`` from grid index ``t_start - 1`` (default: the last) down to 0; x [B, ...] -> samples.

    With ``mask`` (1 = keep), the known ``x0`` noised to the current level replaces the masked part before
    each step. Returns (samples, {"x_inter": [...], "pred_x0": [...]}) logged every ``log_every_t`` steps.
    """
    total = len(grid) if t_start is None else t_start
    if mask is not None and x0 is None:
        raise ValueError("a mask needs x0, the known latents to keep")
    intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
    indices = range(total - 1, -1, -1)
    for i, index in enumerate(progress_iter(indices, progress, desc, total)):
        t = torch.full((x.shape[0],), int(grid.timesteps[index]), device=x.device, dtype=torch.long)
        if mask is not None:
            a_t, _, _, sqrt_one_minus_at = grid.scalars(index, x0)
            known = a_t.sqrt() * x0 + sqrt_one_minus_at * randn_like(x0, generator)
            x = known * mask + (1.0 - mask) * x
        x, pred_x0 = step(x, t, index, i, cond)
        if callback is not None:
            callback(i)
        if img_callback is not None:
            img_callback(pred_x0, i)
        if index % log_every_t == 0 or index == total - 1:
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return x, intermediates


def norm_thresholding(x0: torch.Tensor, value: float) -> torch.Tensor:
    """Rescale each sample of x0 [B, ...] so its RMS is at most ``value`` (the original's dynamic threshold)."""
    rms = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / rms.reshape(-1, *((1,) * (x0.dim() - 1))))

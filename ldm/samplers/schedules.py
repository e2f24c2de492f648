"""Noise-level (sigma) schedules for the samplers: pure float64 functions of the model's discrete schedule.

A discrete DDPM model with ``alpha_bar`` [T] is seen in the variance-exploding parameterisation of Karras et
al. (2022): ``x_sigma = x_t / sqrt(alpha_bar_t)`` and ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)``. Every
schedule returns a descending 1-D float64 tensor of ``n + 1`` sigmas: ``n`` sampling steps, the last entry is the
level the chain ends at (0 = clean data; the DDIM and DPM-Solver grids end at ``sigma_0``, as the originals).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from ldm.modules.diffusionmodules.schedules import make_ddim_timesteps

KARRAS_RHO = 7.0


def _float64(alphas_cumprod: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The schedule as a float64 CPU tensor."""
    if torch.is_tensor(alphas_cumprod):
        return alphas_cumprod.detach().cpu().to(torch.float64)
    return torch.as_tensor(np.asarray(alphas_cumprod), dtype=torch.float64)


def model_sigmas(alphas_cumprod: torch.Tensor | np.ndarray) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) [T] (ascending, float64) of a discrete schedule."""
    acp = _float64(alphas_cumprod)
    return ((1.0 - acp) / acp).sqrt()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Fractional timestep [N] of noise levels sigma [N]: linear interpolation of log sigma between the model's
    discrete levels (``log_sigmas`` [T] ascending), clamped to [0, T - 1]; values within 1e-4 of an integer
    snap to it, so that the model's own levels give its integer timesteps exactly."""
    log_s = sigma.detach().to(torch.float64).cpu().clamp(min=1e-30).log().reshape(-1)
    high = torch.searchsorted(log_sigmas, log_s).clamp(1, log_sigmas.shape[0] - 1)
    low = high - 1
    w = ((log_s - log_sigmas[low]) / (log_sigmas[high] - log_sigmas[low])).clamp(0.0, 1.0)
    t = low.to(torch.float64) + w
    t = torch.where((t - t.round()).abs() < 1e-4, t.round(), t)
    return t.reshape(sigma.shape)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Noise level of fractional timesteps t [N] (log-linear between the model's levels), float64."""
    t = t.to(torch.float64).clamp(0, log_sigmas.shape[0] - 1)
    low = t.floor().long().clamp(max=log_sigmas.shape[0] - 2)
    w = t - low
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[low + 1]).exp()


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """``sigmas`` followed by a final 0 (the clean-data level)."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def normal_sigmas(alphas_cumprod: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    """``n`` levels uniform in the model's timesteps, from T - 1 down to 0, then 0 (k-diffusion ``get_sigmas``)."""
    log_sigmas = model_sigmas(alphas_cumprod).log()
    t = torch.linspace(log_sigmas.shape[0] - 1, 0, n, dtype=torch.float64)
    return append_zero(t_to_sigma(t, log_sigmas))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. (2022): ``n`` levels uniform in sigma^(1/rho) from sigma_max to sigma_min, then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """``n`` levels uniform in log sigma from sigma_max to sigma_min, then 0."""
    return append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def ddim_grid(alphas_cumprod: torch.Tensor | np.ndarray, timesteps: np.ndarray) -> torch.Tensor:
    """The levels of DDIM's (ascending) ``timesteps``, descending, ending at sigma_0 (the original's
    ``alphas_prev[0] = alpha_bar[0]``)."""
    sig = model_sigmas(alphas_cumprod)
    return torch.cat([sig[torch.as_tensor(np.asarray(timesteps)[::-1].copy())], sig[:1]])


def ddim_sigmas(alphas_cumprod: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    """The original DDIM grid of ``range(0, T, T // n) + 1``; more than n steps where the original grid has them."""
    return ddim_grid(alphas_cumprod, make_ddim_timesteps("uniform", n, len(alphas_cumprod), verbose=False))


def dpm_solver_sigmas(alphas_cumprod: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    """The original SD 2 DPM-Solver grid: continuous times uniform from 1 to 1/T, where log alpha interpolates
    the discrete 0.5 log alpha_bar linearly between ``t_k = (k + 1) / T``; ends at sigma_0, no final 0."""
    acp = _float64(alphas_cumprod)
    total = acp.shape[0]
    t = torch.linspace(1.0, 1.0 / total, n + 1, dtype=torch.float64)
    log_alpha = torch.as_tensor(np.interp(t.numpy(), np.arange(1, total + 1) / total, 0.5 * acp.log().numpy()))
    return (1.0 / torch.exp(2 * log_alpha) - 1.0).sqrt()


def respaced_sigmas(alphas_cumprod: torch.Tensor | np.ndarray, timesteps: list[int] | np.ndarray) -> torch.Tensor:
    """Levels of any subset of timesteps, descending, then 0 (Improved DDPM's respaced DDIM ends on x_0)."""
    sig = model_sigmas(alphas_cumprod)
    ts = sorted({int(t) for t in timesteps}, reverse=True)
    if not ts or ts[-1] < 0 or ts[0] >= sig.shape[0]:
        raise ValueError(f"timesteps must be a non-empty subset of [0, {sig.shape[0] - 1}]")
    return append_zero(sig[torch.as_tensor(ts)])


def legacy_ddpm_sigmas(alphas_cumprod: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    """SDXL's default grid (``sgm``'s ``LegacyDDPMDiscretization``): the levels of the timesteps
    ``linspace(T - 1, 0, n, endpoint=False).astype(int)``, descending, then 0 (all T levels for n = T)."""
    sig = model_sigmas(alphas_cumprod)
    total = sig.shape[0]
    if n > total:
        raise ValueError(f"the legacy DDPM grid has at most {total} steps, got {n}")
    t = np.arange(total)[::-1] if n == total else np.linspace(total - 1, 0, n, endpoint=False).astype(int)
    return append_zero(sig[torch.as_tensor(t.copy())])


def _min_max(alphas_cumprod: torch.Tensor | np.ndarray) -> tuple[float, float]:
    sig = model_sigmas(alphas_cumprod)
    return float(sig[0]), float(sig[-1])


SCHEDULES: dict[str, Callable[[torch.Tensor | np.ndarray, int], torch.Tensor]] = {
    "normal": normal_sigmas,
    "karras": lambda acp, n: karras_sigmas(n, *_min_max(acp)),
    "exponential": lambda acp, n: exponential_sigmas(n, *_min_max(acp)),
    "ddim": ddim_sigmas,
    "dpm_solver": dpm_solver_sigmas,
    "legacy_ddpm": legacy_ddpm_sigmas,
}
# What users may choose with --schedule ("uniform" is the web UI's name for "normal").
USER_SCHEDULES = ("normal", "karras", "exponential")
SCHEDULE_ALIASES = {"uniform": "normal", "automatic": None}
SCHEDULE_LABELS = {"normal": "Uniform", "karras": "Karras", "exponential": "Exponential", "ddim": "DDIM",
                   "dpm_solver": "Time uniform", "legacy_ddpm": "Legacy DDPM"}


def make_sigmas(schedule: str, alphas_cumprod: torch.Tensor | np.ndarray, n: int) -> torch.Tensor:
    """The ``n``-step sigma schedule named ``schedule`` for a model with ``alphas_cumprod`` [T]."""
    if n < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {n}")
    try:
        fn = SCHEDULES[schedule]
    except KeyError:
        raise ValueError(f"unknown schedule '{schedule}'; choose one of {', '.join(SCHEDULES)}") from None
    return fn(alphas_cumprod, n)

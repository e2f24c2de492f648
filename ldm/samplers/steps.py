"""What every sampler shares: the step report, the ODE derivative, ancestral splits, the model-call helper."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ldm.samplers.denoiser import DenoiseFn
from ldm.samplers.noise import NoiseSampler


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after step ``i`` (of ``total``): the new x and the denoised estimate it used."""

    i: int
    total: int
    x: torch.Tensor
    sigma: float
    sigma_next: float
    denoised: torch.Tensor


Callback = Optional[Callable[[StepInfo], Any]]


def call(model: DenoiseFn, x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``model(x, sigma)`` with sigma as a [B] tensor on x's device."""
    return model(x, torch.full((x.shape[0],), float(sigma), device=x.device, dtype=torch.float64))


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - D) / sigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): the deterministic step target and the fresh-noise level of an ancestral step.

    eta = 1 is the DDPM posterior, eta = 0 the deterministic step (sigma_up = 0); over the DDIM grid this is
    exactly DDIM's sigma_t(eta) in the sigma parameterisation.
    """
    if not eta or sigma_next <= 0:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(max(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2, 0.0)))
    return math.sqrt(max(sigma_next ** 2 - up ** 2, 0.0)), up


def report(callback: Callback, i: int, total: int, x: torch.Tensor, sigma: float, sigma_next: float,
           denoised: torch.Tensor) -> None:
    """Call ``callback`` (if any) with the step's :class:`StepInfo`."""
    if callback is not None:
        callback(StepInfo(i, total, x, float(sigma), float(sigma_next), denoised))


def add_noise(x: torch.Tensor, noise: Optional[NoiseSampler], sigma: float, sigma_next: float,
              level: float) -> torch.Tensor:
    """x + level * noise(sigma, sigma_next); no draw when the level is 0."""
    if level <= 0:
        return x
    if noise is None:
        raise ValueError("this sampler adds fresh noise (eta > 0): it needs a noise sampler")
    return x + noise(sigma, sigma_next) * level


def levels(sigmas: Any) -> list[float]:
    """The sigma schedule as python floats (the samplers' step coefficients are computed in float64)."""
    if torch.is_tensor(sigmas):
        return [float(s) for s in sigmas.detach().to(torch.float64).cpu()]
    return [float(s) for s in sigmas]

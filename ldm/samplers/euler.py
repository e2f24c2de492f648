"""Euler, Heun, DPM2 (and their ancestral forms) and LMS: the Karras et al. (2022) ODE samplers.

Each function takes ``model(x, sigma [B]) -> denoised``, the start ``x`` (already at the noise level
``sigmas[0]``) and the schedule ``sigmas`` [n + 1] (descending, usually ending at 0), and returns x at
``sigmas[-1]``. Stochastic ones take ``noise(sigma, sigma_next)``; ``eta`` scales their fresh noise.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch

from ldm.samplers.denoiser import DenoiseFn
from ldm.samplers.noise import NoiseSampler
from ldm.samplers.steps import Callback, add_noise, ancestral_step, call, levels, report, to_d


@torch.no_grad()
def sample_euler(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (1 model call per step)."""
    s = levels(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        x = x + to_d(x, s[i], denoised) * (s[i + 1] - s[i])
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                           noise: Optional[NoiseSampler] = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> torch.Tensor:
    """"Euler a": an Euler step down to sigma_down, then fresh noise up to sigma_next (eta 0: Euler)."""
    s = levels(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = x + to_d(x, s[i], denoised) * (down - s[i])
        x = add_noise(x, noise, s[i], s[i + 1], up * s_noise)
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_heun(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None) -> torch.Tensor:
    """Heun's second-order method (2 model calls per step, 1 for a last step to 0)."""
    s = levels(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        d = to_d(x, s[i], denoised)
        dt = s[i + 1] - s[i]
        if s[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, s[i + 1], call(model, x_2, s[i + 1]))
            x = x + (d + d_2) / 2 * dt
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


def _dpm_2_step(model: DenoiseFn, x: torch.Tensor, d: torch.Tensor, sigma: float, target: float) -> torch.Tensor:
    """One DPM-Solver-2 step from sigma to target: the derivative at the log-midpoint."""
    if target == 0:
        return x + d * (target - sigma)
    mid = math.exp(0.5 * (math.log(sigma) + math.log(target)))
    x_2 = x + d * (mid - sigma)
    return x + to_d(x_2, mid, call(model, x_2, mid)) * (target - sigma)


@torch.no_grad()
def sample_dpm_2(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None) -> torch.Tensor:
    """DPM2: second order with the midpoint in log sigma (2 model calls per step, 1 for a last step to 0)."""
    s = levels(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        x = _dpm_2_step(model, x, to_d(x, s[i], denoised), s[i], s[i + 1])
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                           noise: Optional[NoiseSampler] = None, eta: float = 1.0,
                           s_noise: float = 1.0) -> torch.Tensor:
    """"DPM2 a": a DPM2 step down to sigma_down, then fresh noise up to sigma_next."""
    s = levels(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = _dpm_2_step(model, x, to_d(x, s[i], denoised), s[i], down)
        if down > 0:
            x = add_noise(x, noise, s[i], s[i + 1], up * s_noise)
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


def lms_coefficient(order: int, s: list[float], i: int, j: int) -> float:
    """Integral over [s_i, s_{i+1}] of the Lagrange basis polynomial of node s_{i-j} among s_i ... s_{i-order+1}
    (exact: the polynomial is integrated in closed form)."""
    if order - 1 > i:
        raise ValueError(f"order {order} is too high for step {i}")
    nodes = [s[i - k] for k in range(order) if k != j]
    poly = np.polynomial.Polynomial.fromroots(nodes) if nodes else np.polynomial.Polynomial([1.0])
    poly = poly / float(np.prod([s[i - j] - n for n in nodes])) if nodes else poly
    antiderivative = poly.integ()
    return float(antiderivative(s[i + 1]) - antiderivative(s[i]))


@torch.no_grad()
def sample_lms(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
               order: int = 4) -> torch.Tensor:
    """Linear multistep (up to ``order`` past derivatives, variable step sizes; 1 model call per step)."""
    s = levels(sigmas)
    ds: list[torch.Tensor] = []
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        ds = (ds + [to_d(x, s[i], denoised)])[-order:]
        cur = min(i + 1, order)
        coeffs = [lms_coefficient(cur, s, i, j) for j in range(cur)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x

"""The DPM-Solver++ family (Lu et al. 2022) in the sigma parameterisation: 2S a, SDE, 2M, 2M SDE, 3M SDE.

They step in lambda = -log sigma with the data prediction D; ``sample_dpmpp_2m`` is also the update of the
original SD 2 DPM-Solver (:func:`ldm.samplers.original.sample_dpm_solver`). Signatures as in
:mod:`ldm.samplers.euler`.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ldm.samplers.denoiser import DenoiseFn
from ldm.samplers.noise import NoiseSampler
from ldm.samplers.steps import Callback, add_noise, ancestral_step, call, levels, report, to_d


def exp_step(x: torch.Tensor, sigma: float, target: float, denoised: torch.Tensor) -> torch.Tensor:
    """First-order exponential-integrator step (DPM-Solver++ 1 = DDIM) from sigma to target with D fixed."""
    if target == 0:
        return denoised
    return (target / sigma) * x - math.expm1(math.log(target) - math.log(sigma)) * denoised


def multistep_2m(x: torch.Tensor, sigma: float, target: float, denoised: torch.Tensor,
                 old_denoised: Optional[torch.Tensor], sigma_prev: Optional[float]) -> torch.Tensor:
    """DPM-Solver++(2M) step from sigma to target: D extrapolated from the previous step's D (first order
    without one, or to 0)."""
    if old_denoised is None or sigma_prev is None or target == 0:
        return exp_step(x, sigma, target, denoised)
    h = math.log(sigma) - math.log(target)
    r = (math.log(sigma_prev) - math.log(sigma)) / h
    d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return exp_step(x, sigma, target, d)


@torch.no_grad()
def sample_dpmpp_2m(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None) -> torch.Tensor:
    """"DPM++ 2M": second-order multistep (1 model call per step)."""
    s = levels(sigmas)
    old = None
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        x = multistep_2m(x, s[i], s[i + 1], denoised, old, s[i - 1] if i > 0 else None)
        old = denoised
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                              noise: Optional[NoiseSampler] = None, eta: float = 1.0,
                              s_noise: float = 1.0) -> torch.Tensor:
    """"DPM++ 2S a": a second-order single step (midpoint in lambda) to sigma_down, then fresh noise
    (2 model calls per step, 1 for a last step to 0)."""
    s = levels(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        down, up = ancestral_step(s[i], s[i + 1], eta)
        if down == 0:
            x = x + to_d(x, s[i], denoised) * (down - s[i])
        else:
            mid = math.sqrt(s[i] * down)
            x_2 = exp_step(x, s[i], mid, denoised)
            x = exp_step(x, s[i], down, call(model, x_2, mid))
        if s[i + 1] > 0:
            x = add_noise(x, noise, s[i], s[i + 1], up * s_noise)
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                     noise: Optional[NoiseSampler] = None, eta: float = 1.0, s_noise: float = 1.0,
                     r: float = 0.5) -> torch.Tensor:
    """"DPM++ SDE": stochastic second-order single step with an intermediate level at fraction ``r`` in
    lambda (2 model calls per step); its two noise draws overlap, so it wants a Brownian-tree noise sampler."""
    s = levels(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        if s[i + 1] == 0:
            x = x + to_d(x, s[i], denoised) * (s[i + 1] - s[i])
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            mid = math.exp(-(-math.log(s[i]) + h * r))
            down, up = ancestral_step(s[i], mid, eta)
            x_2 = add_noise(exp_step(x, s[i], down, denoised), noise, s[i], mid, up * s_noise)
            denoised_2 = call(model, x_2, mid)
            down, up = ancestral_step(s[i], s[i + 1], eta)
            fac = 1 / (2 * r)
            x = exp_step(x, s[i], down, (1 - fac) * denoised + fac * denoised_2)
            x = add_noise(x, noise, s[i], s[i + 1], up * s_noise)
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                        noise: Optional[NoiseSampler] = None, eta: float = 1.0, s_noise: float = 1.0,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """"DPM++ 2M SDE" (``solver_type`` "midpoint", or "heun" for "DPM++ 2M SDE Heun"); 1 model call per step."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got '{solver_type}'")
    s = levels(sigmas)
    old, h_last = None, None
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = (s[i + 1] / s[i]) * math.exp(-eta_h) * x + phi * denoised
            if old is not None:
                r = h_last / h
                coeff = (phi / (-h - eta_h) + 1) if solver_type == "heun" else 0.5 * phi
                x = x + coeff * (1 / r) * (denoised - old)
            x = add_noise(x, noise, s[i], s[i + 1], s[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise)
            h_last = h
        old = denoised
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                        noise: Optional[NoiseSampler] = None, eta: float = 1.0,
                        s_noise: float = 1.0) -> torch.Tensor:
    """"DPM++ 3M SDE": third-order multistep from the last three D (1 model call per step)."""
    s = levels(sigmas)
    d_1 = d_2 = None
    h_1 = h_2 = None
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        h = None
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])
            h_eta = h * (eta + 1)
            x = math.exp(-h_eta) * x - math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - d_1) / (h_1 / h))
            x = add_noise(x, noise, s[i], s[i + 1], s[i + 1] * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x

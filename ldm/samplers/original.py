"""The original Stable Diffusion samplers on the same footing as the others: DDIM, PLMS and DPM-Solver.

In the sigma parameterisation a DDIM step is ``x' = D + sigma_down * eps`` plus ``sigma_up`` fresh noise (the
ancestral split of :func:`~ldm.samplers.steps.ancestral_step` equals DDIM's ``sigma_t(eta)``), and a PLMS step
is the same update with a multistep eps. Over their own grids (``ddim`` / ``dpm_solver`` schedules, which end at
sigma_0 rather than 0) they reproduce the original classes' numbers.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from ldm.samplers.denoiser import DenoiseFn
from ldm.samplers.dpmpp import exp_step, multistep_2m
from ldm.samplers.noise import NoiseSampler
from ldm.samplers.steps import Callback, add_noise, ancestral_step, call, levels, report

DenoisedFn = Optional[Callable[[torch.Tensor], torch.Tensor]]


@torch.no_grad()
def sample_ddim(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                noise: Optional[NoiseSampler] = None, eta: float = 0.0,
                denoised_fn: DenoisedFn = None) -> torch.Tensor:
    """DDIM (1 model call per step); eta > 0 adds fresh noise (eta 1: DDPM-like). ``denoised_fn`` may post-process
    the x0 estimate (the original's thresholding / quantisation) while the direction keeps the raw eps."""
    s = levels(sigmas)
    for i in range(len(s) - 1):
        denoised = call(model, x, s[i])
        eps = (x - denoised) / s[i]
        if denoised_fn is not None:
            denoised = denoised_fn(denoised)
        down, up = ancestral_step(s[i], s[i + 1], eta)
        x = add_noise(denoised + down * eps, noise, s[i], s[i + 1], up)
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


def adams_bashforth(eps: torch.Tensor, old: list[torch.Tensor]) -> torch.Tensor:
    """PLMS's multistep eps of order len(old) + 1 (2 to 4) from the current and the previous eps."""
    if len(old) == 1:
        return (3 * eps - old[-1]) / 2
    if len(old) == 2:
        return (23 * eps - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * eps - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


@torch.no_grad()
def sample_plms(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                denoised_fn: DenoisedFn = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022): DDIM updates with an Adams-Bashforth eps; the first step is a pseudo improved
    Euler step (2 model calls), later steps make 1."""
    s = levels(sigmas)
    old: list[torch.Tensor] = []

    def update(x: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x0 = x - s[i] * eps
        x0 = denoised_fn(x0) if denoised_fn is not None else x0
        return x0 + s[i + 1] * eps, x0

    for i in range(len(s) - 1):
        eps = (x - call(model, x, s[i])) / s[i]
        if old:
            eps_prime = adams_bashforth(eps, old)
        else:
            x_mid, _ = update(x, eps, i)
            level = s[i + 1] if i + 2 < len(s) else s[i]  # the next grid level (the original: max(index - 1, 0))
            eps_prime = (eps + (x_mid - call(model, x_mid, level)) / level) / 2
        x, denoised = update(x, eps_prime, i)
        old = (old + [eps])[-3:]
        report(callback, i, len(s) - 1, x, s[i], s[i + 1], denoised)
    return x


@torch.no_grad()
def sample_dpm_solver(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None,
                      order: int = 2, lower_order_final: bool = True) -> torch.Tensor:
    """The original SD 2 DPM-Solver++ (multistep, order 1 or 2, 1 model call per step): first order at the
    start and, with ``lower_order_final`` and fewer than 15 steps, on the last step; no final step to 0."""
    if order not in (1, 2):
        raise ValueError(f"multistep DPM-Solver++ supports order 1 or 2, got {order}")
    s = levels(sigmas)
    n = len(s) - 1
    old = None
    for i in range(n):
        denoised = call(model, x, s[i])
        step_order = min(order, i + 1)
        if lower_order_final and n < 15:
            step_order = min(step_order, n - i)
        if step_order == 1:
            x = exp_step(x, s[i], s[i + 1], denoised)
        else:
            x = multistep_2m(x, s[i], s[i + 1], denoised, old, s[i - 1])
        old = denoised
        report(callback, i, n, x, s[i], s[i + 1], denoised)
    return x

"""Likelihood of a diffusion model: the variational bound in bits per dimension (Ho et al. 2020, Nichol & Dhariwal 2021).

``-log p(x_0) <= L_T + sum_{t>=1} L_{t-1} + L_0`` with the prior term ``L_T = KL(q(x_T | x_0) || N(0, I))``,
the KL terms ``L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))`` and the decoder term
``L_0 = -log p(x_0 | x_1)``, a Gaussian discretized to the 256 levels of 8-bit data scaled to [-1, 1].
Schedule index i here is timestep i of the model (index 0 is the decoder). Everything is per sample, averaged
over the data dimensions, in bits.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch

from ldm.models.diffusion.process import DiffusionProcess, ReverseStep
from ldm.models.diffusion.variance import split_output
from ldm.util import mean_flat

LOG2 = math.log(2.0)
# 8-bit data in [-1, 1]: level k sits at 2k/255 - 1, its bin is +-1/255 wide.
HALF_BIN = 1.0 / 255.0

ModelFn = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) in nats (arguments broadcast)."""
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def _log_sub_exp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(e^a - e^b) for a >= b, stable."""
    gap = -torch.expm1((b - a).clamp(max=0.0))  # 1 - e^(b - a), in [0, 1]
    return a + torch.log(gap.clamp(min=1e-30))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log P(x) in nats of N(means, e^(2 log_scales)) discretized to the 8-bit levels of x in [-1, 1].

    The lowest and highest bins extend to -inf / +inf, so the 256 probabilities sum to 1. Computed with
    log-CDFs of the nearer tail (accurate far out in either tail).
    """
    if x.shape != means.shape:
        raise ValueError(f"x {list(x.shape)} and means {list(means.shape)} must have the same shape")
    inv_std = torch.exp(-log_scales)
    upper = (x - means + HALF_BIN) * inv_std
    lower = (x - means - HALF_BIN) * inv_std
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(z <= upper)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(z > lower)
    # middle bins: P(lower < z <= upper), taken in the tail that keeps precision
    left = _log_sub_exp(log_cdf_upper, torch.special.log_ndtr(lower))
    right = _log_sub_exp(log_sf_lower, torch.special.log_ndtr(-upper))
    middle = torch.where(lower + upper > 0, right, left)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, middle))


def vlb_terms(process: DiffusionProcess, step: ReverseStep, x_start: torch.Tensor, x_t: torch.Tensor,
              t: torch.Tensor) -> torch.Tensor:
    """Per-sample bound term [B] in bits/dim: the KL to the true posterior for t > 0, the decoder NLL at t = 0."""
    decoder = t == 0
    out = x_start.new_zeros(x_start.shape[0])
    if not decoder.all():
        true_mean, _, _ = process.q_posterior(x_start, x_t, t)
        true_log_var = _true_log_variance(process, t, x_t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, step.mean, step.log_variance)) / LOG2
        out = torch.where(decoder, out, kl)
    if decoder.any():
        nll = -mean_flat(discretized_gaussian_log_likelihood(
            x_start, step.mean, (0.5 * step.log_variance).expand_as(x_start))) / LOG2
        out = torch.where(decoder, nll, out)
    return out


def _true_log_variance(process: DiffusionProcess, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # log beta tilde_t; at t = 0 (a zero variance) the decoder term is used instead, so any finite entry will do
    index = t.clamp(min=min(1, process.num_timesteps - 1))
    return process.posterior_log_variance_clipped.gather(-1, index).reshape(-1, *((1,) * (x.dim() - 1)))


def prior_bpd(process: DiffusionProcess, x_start: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) [B] in bits/dim: what the last noise level leaves of the data."""
    t = torch.full((x_start.shape[0],), process.num_timesteps - 1, dtype=torch.long, device=x_start.device)
    mean, _, log_var = process.q_mean_variance(x_start, t)
    return mean_flat(normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(mean))) / LOG2


def model_reverse_step(process: DiffusionProcess, model_fn: ModelFn, x_t: torch.Tensor, t: torch.Tensor, cond: Any,
                       clip_denoised: bool = False) -> ReverseStep:
    """p(x_{t-1} | x_t) of the network ``model_fn(x, model timesteps, cond)`` (raw output, 2C channels if learned)."""
    timestep_map = getattr(process, "timesteps", None)  # a respaced schedule's original timesteps
    model_t = timestep_map[t] if isinstance(timestep_map, torch.Tensor) else t
    mean_out, var_values = split_output(model_fn(x_t, model_t, cond), process.model_var_type, x_t.shape[1])
    return process.reverse_step(mean_out, var_values, x_t, t, clip_denoised)


@torch.no_grad()
def bits_per_dim(process: DiffusionProcess, model_fn: ModelFn, x_start: torch.Tensor, cond: Any = None,
                 clip_denoised: bool = True, generator: torch.Generator | None = None,
                 progress: Callable[[Any], Any] | None = None) -> dict[str, torch.Tensor]:
    """The full bound of a batch x_start [B, C, ...] (8-bit data in [-1, 1]) over every timestep, in bits/dim.

    Returns {"total_bpd" [B], "prior_bpd" [B], "vb" [B, T] (the per-timestep terms, index 0 = decoder),
    "xstart_mse" [B, T]}. Each timestep draws its own noise (from ``generator`` when given). ``progress`` may
    wrap the timestep iterator (e.g. ``tqdm``).
    """
    n, steps = x_start.shape[0], range(process.num_timesteps - 1, -1, -1)
    vb = x_start.new_zeros(n, process.num_timesteps)
    mse = x_start.new_zeros(n, process.num_timesteps)
    for i in (progress(steps) if progress is not None else steps):
        t = torch.full((n,), i, dtype=torch.long, device=x_start.device)
        noise = torch.randn(x_start.shape, generator=generator, device=x_start.device if generator is None
                            else generator.device, dtype=x_start.dtype).to(x_start.device)
        x_t = process.q_sample(x_start, t, noise)
        step = model_reverse_step(process, model_fn, x_t, t, cond, clip_denoised)
        vb[:, i] = vlb_terms(process, step, x_start, x_t, t)
        mse[:, i] = mean_flat((step.pred_x0 - x_start) ** 2)
    prior = prior_bpd(process, x_start)
    return {"total_bpd": vb.sum(dim=1) + prior, "prior_bpd": prior, "vb": vb, "xstart_mse": mse}

"""One denoiser for every sampler: the denoised estimate ``D(x, sigma)`` of a discrete-time diffusion model.

In the sigma parameterisation ``x = x0 + sigma * eps``; the network sees ``c_in * x`` with
``c_in = 1 / sqrt(sigma^2 + 1)`` (the DDPM sample at that level) and the fractional timestep of sigma among its
own discrete levels. Its output (eps, x0 or v, after classifier-free guidance) becomes the x0 estimate.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ldm.models.diffusion.parameterization import Prediction
from ldm.samplers.schedules import model_sigmas, sigma_to_t

# A sampler's view of the model: denoised estimate [B, ...] of x [B, ...] at noise levels sigma [B].
DenoiseFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype).reshape(-1, *((1,) * (x.dim() - 1)))


class SigmaDenoiser:
    """``D(x, sigma, cond)`` of a raw denoiser ``fn(x, t, cond)`` (a :class:`~ldm.models.diffusion.denoiser.
    Denoiser`, possibly wrapped in classifier-free guidance) with ``prediction`` and ``alphas_cumprod`` [T]."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.prediction = Prediction(fn.prediction)
        self.log_sigmas = model_sigmas(fn.alphas_cumprod).log()

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The model's discrete schedule [T]."""
        return self.fn.alphas_cumprod

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's (fractional) timestep [B] for noise levels sigma [B], float32 on sigma's device."""
        return sigma_to_t(sigma, self.log_sigmas).to(device=sigma.device, dtype=torch.float32)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """Denoised estimate [B, ...] of x [B, ...] at levels sigma [B]."""
        s = sigma.to(torch.float64).reshape(-1)
        c_in = _bcast((s * s + 1).rsqrt(), x)
        out = self.fn(x * c_in, self.timestep(sigma.reshape(-1)), cond)
        if self.prediction is Prediction.EPS:
            return x - _bcast(s, x) * out
        if self.prediction is Prediction.V:
            return x * _bcast(1 / (s * s + 1), x) - out * _bcast(s * (s * s + 1).rsqrt(), x)
        return out

    def bind(self, cond: Any) -> DenoiseFn:
        """``D(x, sigma)`` with the conditioning fixed."""
        return lambda x, sigma: self(x, sigma, cond)


def guided(denoiser: Any, uncond: Any = None, scale: float = 1.0) -> SigmaDenoiser:
    """D(x, sigma, cond) of a raw denoiser (e.g. :class:`~ldm.models.diffusion.denoiser.ModelDenoiser`) with
    classifier-free guidance: one batched pass over [uncond; cond] when ``scale`` != 1."""
    from ldm.models.diffusion.guidance import ClassifierFreeGuidance

    return SigmaDenoiser(ClassifierFreeGuidance(denoiser, uncond, scale))


def masked(denoise: DenoiseFn, known: torch.Tensor, mask: torch.Tensor) -> DenoiseFn:
    """Keep the known region: D' = mask * known + (1 - mask) * D (mask 1 = keep; the web UI's inpainting with
    any model, so it works with every sampler); known [B, ...] clean latents, mask broadcastable on them."""
    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return mask * known + (1.0 - mask) * denoise(x, sigma)
    return fn

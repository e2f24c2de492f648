"""Forward-process maths of a diffusion model over its registered schedule buffers (a mixin of ``DDPM``).

``x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps`` with acp = ``alphas_cumprod``; every method takes timesteps
t [B] (long) and tensors [B, ...], and reads the float32 buffers registered by ``DDPM.register_schedule``.
"""
from __future__ import annotations

import torch

from ldm.models.diffusion.parameterization import Prediction, extract, training_target
from ldm.util import default


class DiffusionProcess:
    """q(x_t | x_0), its posterior and the eps / x0 / v conversions, under the original method names."""

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and log-variance of q(x_t | x_0) for x_start [B, ...], t [B]."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start.shape)
        return mean, variance, extract(self.log_one_minus_alphas_cumprod, t, x_start.shape)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noised x_t [B, ...] = sqrt(acp_t) x_start + sqrt(1 - acp_t) noise (noise drawn when None)."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        return (extract(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v target [B, ...] = sqrt(acp_t) noise - sqrt(1 - acp_t) x."""
        return training_target(Prediction.V, x, noise, extract(self.sqrt_alphas_cumprod, t, x.shape),
                               extract(self.sqrt_one_minus_alphas_cumprod, t, x.shape))

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x0 [B, ...] from x_t and the noise eps."""
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """x0 [B, ...] = sqrt(acp_t) x_t - sqrt(1 - acp_t) v."""
        return (extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """eps [B, ...] = sqrt(acp_t) v + sqrt(1 - acp_t) x_t."""
        return (extract(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (extract(self.posterior_mean_coef1, t, x_t.shape) * x_start
                + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t)
        return (mean, extract(self.posterior_variance, t, x_t.shape),
                extract(self.posterior_log_variance_clipped, t, x_t.shape))


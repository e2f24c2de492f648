"""Diffusion-process maths over the schedule buffers: a mixin of ``DDPM``, and :class:`DiffusionSchedule`.

``x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) eps`` with acp = ``alphas_cumprod``; every method takes timesteps
t [B] (long) and tensors [B, ...], and reads the float32 arrays named as the buffers ``DDPM.register_schedule``
registers. :class:`DiffusionSchedule` holds the same arrays without a network, for samplers and likelihood
evaluation over a model's schedule or a respaced subset of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ldm.models.diffusion.parameterization import Prediction, extract, training_target
from ldm.models.diffusion.variance import VarianceType, model_log_variance
from ldm.modules.diffusionmodules.schedules import DDPM_BUFFER_NAMES, ddpm_schedule
from ldm.util import default


@dataclass
class ReverseStep:
    """The Gaussian p(x_{t-1} | x_t) a model implies: mean and log variance [B, C, ...] (or [B, 1, ...]), and x0."""

    mean: torch.Tensor
    log_variance: torch.Tensor
    pred_x0: torch.Tensor

    @property
    def variance(self) -> torch.Tensor:
        """exp(log_variance)."""
        return self.log_variance.exp()


class DiffusionProcess:
    """q(x_t | x_0), its posterior and the eps / x0 / v conversions, under the original method names."""

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    prediction: Prediction
    model_var_type: VarianceType = VarianceType.FIXED_SMALL

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


    def predict_start_from_output(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x0 [B, ...] implied by the network's (mean) output for x_t at t, whatever it predicts."""
        if self.prediction is Prediction.EPS:
            return self.predict_start_from_noise(x_t, t, output)
        if self.prediction is Prediction.V:
            return self.predict_start_from_z_and_v(x_t, t, output)
        return output

    def reverse_step(self, mean_output: torch.Tensor, var_values: torch.Tensor | None, x_t: torch.Tensor,
                     t: torch.Tensor, clip_denoised: bool = False) -> ReverseStep:
        """p(x_{t-1} | x_t) from the network's mean output and variance values (None for fixed variances).

        The mean is the true posterior mean at the predicted x0 (clipped to [-1, 1] with ``clip_denoised``).
        """
        pred_x0 = self.predict_start_from_output(mean_output, x_t, t)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior(pred_x0, x_t, t)
        log_variance = model_log_variance(self.model_var_type, t, x_t, self.betas, self.posterior_log_variance_clipped,
                                          var_values)
        return ReverseStep(mean, log_variance, pred_x0)


class DiffusionSchedule(DiffusionProcess):
    """The process maths over plain tensors (no network): a model's own schedule, any betas, or a respaced subset.

    ``timesteps`` [T'] maps the schedule's index i to the timestep the network was trained with (identity unless
    respaced). Build with :meth:`from_betas`, :meth:`from_model` or :meth:`respaced`.
    """

    def __init__(self, arrays: dict[str, torch.Tensor], prediction: Prediction | str = Prediction.EPS,
                 model_var_type: VarianceType | str = VarianceType.FIXED_SMALL,
                 timesteps: torch.Tensor | None = None, v_posterior: float = 0.0) -> None:
        missing = [name for name in DDPM_BUFFER_NAMES if name not in arrays]
        if missing:
            raise ValueError(f"a diffusion schedule needs the arrays {missing}")
        for name in DDPM_BUFFER_NAMES:
            setattr(self, name, arrays[name])
        self.prediction = Prediction.parse(prediction)
        self.model_var_type = VarianceType.parse(model_var_type)
        self.num_timesteps = int(self.betas.shape[0])
        self.v_posterior = float(v_posterior)
        self.timesteps = (torch.arange(self.num_timesteps, device=self.betas.device) if timesteps is None
                          else torch.as_tensor(timesteps, dtype=torch.long, device=self.betas.device))

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray, prediction: Prediction | str = Prediction.EPS,
                   model_var_type: VarianceType | str = VarianceType.FIXED_SMALL, v_posterior: float = 0.0,
                   device: torch.device | str | None = None, timesteps: Sequence[int] | None = None,
                   dtype: torch.dtype = torch.float32) -> "DiffusionSchedule":
        """The schedule of ``betas`` [T] (float64 maths, stored as ``dtype`` like the model's buffers)."""
        arrays = {k: torch.tensor(v, dtype=dtype, device=device) for k, v in ddpm_schedule(betas, v_posterior).items()}
        ts = None if timesteps is None else torch.as_tensor(list(timesteps), dtype=torch.long, device=device)
        return cls(arrays, prediction, model_var_type, ts, v_posterior)

    @classmethod
    def from_model(cls, model: Any) -> "DiffusionSchedule":
        """The schedule of a ``DDPM``/``LatentDiffusion`` (its own buffers, shared, not copied)."""
        arrays = {name: getattr(model, name) for name in DDPM_BUFFER_NAMES}
        return cls(arrays, model.prediction, getattr(model, "model_var_type", VarianceType.FIXED_SMALL),
                   v_posterior=getattr(model, "v_posterior", 0.0))

    def respaced(self, use_timesteps: Sequence[int]) -> "DiffusionSchedule":
        """The process that visits only ``use_timesteps`` (of this schedule's indices), as Improved DDPM.

        Its alpha_bar are this schedule's at those steps; its betas follow as 1 - alpha_bar_i / alpha_bar_{i-1}
        (computed in float64), and the network still receives the original timesteps.
        """
        steps = sorted({int(s) for s in use_timesteps})
        if not steps or steps[0] < 0 or steps[-1] >= self.num_timesteps:
            raise ValueError(f"respaced timesteps must be a non-empty subset of [0, {self.num_timesteps - 1}], "
                             f"got {list(use_timesteps)[:8]}")
        acp = np.cumprod(1.0 - self.betas.detach().double().cpu().numpy())[steps]
        betas = 1.0 - acp / np.append(1.0, acp[:-1])
        return DiffusionSchedule.from_betas(betas, self.prediction, self.model_var_type, self.v_posterior,
                                            self.betas.device, self.timesteps[steps].tolist(), self.betas.dtype)

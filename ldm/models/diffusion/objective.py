"""Training objectives of the diffusion models (a mixin of ``DDPM``): the original losses and Improved DDPM's.

* ``l2`` / ``l1`` (the original): ``loss = l_simple_weight * mean(L_simple / e^logvar_t + logvar_t)
  + original_elbo_weight * mean(lvlb_weights[t] * L_simple)``, L_simple the per-sample error of the mean output.
* ``hybrid``: the ``l2`` loss plus ``lambda_vlb * T * L_t``, where L_t is the variational-bound term at the
  sampled t (bits/dim) computed with the mean output detached, so it trains only the learned variance; with
  lambda_vlb = 0.001 this is Improved DDPM's ``L_simple + 0.001 L_vlb`` (the bound's T terms estimated by T L_t).
* ``snr_gamma`` (not in the original): the simple loss is weighted per sample by Min-SNR-gamma
  (``schedules.min_snr_weights``) before the logvar term; ``loss_simple`` is still logged unweighted.
* ``vlb``: the bound alone, ``T * L_t`` (mean and variance both trained by it).

Keys of the loss dict: ``<train|val>/loss_simple``, ``/loss_vlb`` (the original's reweighted simple loss),
``/loss``; with hybrid / vlb also ``/loss_vb`` (the mean L_t, bits/dim).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from ldm.models.diffusion.likelihood import vlb_terms
from ldm.models.diffusion.parameterization import extract, training_target
from ldm.models.diffusion.variance import VarianceType, split_output
from ldm.util import default, mean_flat

LOSS_TYPES = ("l1", "l2", "hybrid", "vlb")


def check_objective(loss_type: str, var_type: VarianceType) -> None:
    """Raise a ValueError for a loss type that is unknown or cannot train this variance type."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type '{loss_type}'; choose one of {', '.join(LOSS_TYPES)}")
    if var_type.learned and loss_type in ("l1", "l2"):
        raise ValueError(f"model_var_type '{var_type.value}' learns the variance, which loss_type '{loss_type}' "
                         f"does not train: use loss_type hybrid (or vlb)")
    if loss_type == "hybrid" and not var_type.learned:
        raise ValueError(f"loss_type hybrid trains a learned variance, but model_var_type is '{var_type.value}': "
                         f"use learned_range / learned, or loss_type l2")


class DiffusionObjective:
    """``get_loss`` and ``p_losses`` over the host's schedule buffers, ``apply_model`` and loss settings."""

    loss_type: str
    model_var_type: VarianceType
    lambda_vlb: float
    snr_gamma: float | None = None  # Min-SNR-gamma weighting of the simple loss (buffer ``snr_weights``) when set

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor, mean: bool = True) -> torch.Tensor:
        """l1 error for loss_type l1, else squared error; averaged when ``mean`` else elementwise."""
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred, reduction="mean" if mean else "none")

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor,
                 noise: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, {"<train|val>/loss_simple", "/loss_vlb", "/loss", ...}) of denoising x_start [B, ...] at t [B]."""
        noise = default(noise, lambda: torch.randn_like(x_start))
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        return self.losses_from_output(model_output, x_start, x_noisy, t, noise)

    def losses_from_output(self, model_output: torch.Tensor, x_start: torch.Tensor, x_noisy: torch.Tensor,
                           t: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss and its logged parts for a raw network output at x_noisy = q_sample(x_start, t, noise)."""
        mean_out, var_values = split_output(model_output, self.model_var_type, x_start.shape[1])
        target = training_target(self.prediction, x_start, noise,
                                 extract(self.sqrt_alphas_cumprod, t, x_start.shape),
                                 extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape))
        prefix = "train" if self.training else "val"
        loss_simple = mean_flat(self.get_loss(mean_out, target, mean=False))
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}
        logvar_t = self.logvar.to(x_start.device)[t]
        weighted = loss_simple if self.snr_gamma is None else loss_simple * self.snr_weights[t]
        loss = weighted / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()
        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        if self.loss_type in ("hybrid", "vlb"):
            vb = self.vb_term(mean_out.detach() if self.loss_type == "hybrid" else mean_out, var_values,
                              x_start, x_noisy, t).mean()
            loss_dict[f"{prefix}/loss_vb"] = vb
            scaled = self.num_timesteps * vb
            loss = loss + self.lambda_vlb * scaled if self.loss_type == "hybrid" else scaled
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def vb_term(self, mean_out: torch.Tensor, var_values: torch.Tensor | None, x_start: torch.Tensor,
                x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample variational-bound term L_t [B] (bits/dim; decoder NLL at t = 0), x0 prediction unclipped."""
        step = self.reverse_step(mean_out, var_values, x_t, t, clip_denoised=False)
        return vlb_terms(self, step, x_start, x_t, t)

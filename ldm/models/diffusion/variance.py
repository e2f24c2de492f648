"""The variance of the reverse process p(x_{t-1} | x_t): fixed (Ho et al. 2020) or learned (Nichol & Dhariwal 2021).

* ``fixed_small``: the true posterior variance beta tilde_t (the original Stable Diffusion choice);
* ``fixed_large``: beta_t;
* ``learned``: the network's second C output channels are the log variance itself;
* ``learned_range``: the second C channels are v in [-1, 1], and
  ``log var = (1 + v) / 2 * log beta_t + (1 - v) / 2 * log beta tilde_t``.

beta tilde_0 is 0 (x_0 is known exactly given x_1 and x_0), so as in Improved DDPM the "small" log variance uses
beta tilde_1 at t = 0: the decoder likelihood stays finite and ``learned_range`` keeps a finite lower end.
"""
from __future__ import annotations

from enum import Enum
from typing import Any, Mapping

import torch

from ldm.models.diffusion.parameterization import extract


class VarianceType(str, Enum):
    """How a model sets the variance of p(x_{t-1} | x_t) (the config's ``model_var_type`` strings)."""

    FIXED_SMALL = "fixed_small"
    FIXED_LARGE = "fixed_large"
    LEARNED = "learned"
    LEARNED_RANGE = "learned_range"

    @classmethod
    def parse(cls, value: "str | VarianceType") -> "VarianceType":
        """The member for ``value``, with an error listing the valid names."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown model_var_type '{value}'; choose one of "
                             f"{', '.join(v.value for v in cls)}") from None

    @property
    def learned(self) -> bool:
        """True when the network outputs the variance (2C output channels)."""
        return self in (VarianceType.LEARNED, VarianceType.LEARNED_RANGE)


def log_variance_bounds(betas: torch.Tensor,
                        posterior_log_variance_clipped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log beta tilde_t, log beta_t), each [T]; entry 0 of the first is log beta tilde_1 (see the module doc).

    With a single timestep there is no beta tilde_1, and log beta_0 is used for both.
    """
    large = torch.log(betas)
    if betas.shape[0] < 2:
        return large.clone(), large
    small = torch.cat([posterior_log_variance_clipped[1:2], posterior_log_variance_clipped[1:]])
    return small, large


def check_output_channels(unet_config: Mapping[str, Any], channels: int, var_type: VarianceType) -> None:
    """Raise when the network config's ``out_channels`` cannot hold this variance type's output (C or 2C)."""
    if not var_type.learned or not isinstance(unet_config, Mapping):
        return
    out = (unet_config.get("params") or {}).get("out_channels")
    if out is not None and int(out) != 2 * channels:
        raise ValueError(f"model_var_type '{var_type.value}' needs the network to output 2 x {channels} channels "
                         f"(mean, then variance): set unet_config.params.out_channels to {2 * channels}, not {out}")


def split_output(output: torch.Tensor, var_type: VarianceType,
                 channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mean part [B, C, ...], variance values [B, C, ...] or None) of a raw network output.

    Learned-variance networks output 2C channels: the mean parameterization (eps, x0 or v) first, then the
    variance values.
    """
    if not var_type.learned:
        return output, None
    if output.shape[1] != 2 * channels:
        raise ValueError(f"model_var_type '{var_type.value}' needs a network with 2 x {channels} = {2 * channels} "
                         f"output channels (mean, then variance), got {output.shape[1]}: set the UNet's "
                         f"out_channels to {2 * channels}")
    return output[:, :channels], output[:, channels:]


def model_log_variance(var_type: VarianceType, t: torch.Tensor, like: torch.Tensor, betas: torch.Tensor,
                       posterior_log_variance_clipped: torch.Tensor,
                       var_values: torch.Tensor | None = None) -> torch.Tensor:
    """Log variance of p(x_{t-1} | x_t) for timesteps t [B]: [B, 1, ...] when fixed, like ``var_values`` if learned."""
    small, large = log_variance_bounds(betas, posterior_log_variance_clipped)
    if var_type is VarianceType.FIXED_SMALL:
        return extract(small, t, like.shape)
    if var_type is VarianceType.FIXED_LARGE:
        return extract(large, t, like.shape)
    if var_values is None:
        raise ValueError(f"model_var_type '{var_type.value}' needs the network's variance output")
    if var_type is VarianceType.LEARNED:
        return var_values
    frac = (var_values + 1) / 2
    return frac * extract(large, t, like.shape) + (1 - frac) * extract(small, t, like.shape)

"""What a diffusion network predicts, and the pure conversions between its output, eps and x0.

The forward process is ``x_t = alpha_t * x0 + sigma_t * eps`` with ``alpha_t = sqrt(alpha_bar_t)`` and
``sigma_t = sqrt(1 - alpha_bar_t)``. Every sampler and loss goes through these functions, so that adding a
parameterization means adding one branch here.
"""
from __future__ import annotations

from enum import Enum
from typing import Sequence

import torch


class Prediction(str, Enum):
    """The quantity a network outputs (the original ``parameterization`` strings are the values)."""

    EPS = "eps"  # the noise eps
    X0 = "x0"  # the clean sample x0
    V = "v"  # v = alpha_t * eps - sigma_t * x0 (Salimans & Ho 2022)

    @classmethod
    def parse(cls, value: "str | Prediction") -> "Prediction":
        """The member for ``value``, with an error listing the valid names."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown parameterization '{value}'; choose one of "
                             f"{', '.join(p.value for p in cls)}") from None


def extract(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """``a[t]`` for a schedule ``a`` [T] and timesteps ``t`` [B], shaped [B, 1, ..., 1] to broadcast on ``x_shape``."""
    return a.gather(-1, t).reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))


def split_prediction(output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
                     prediction: Prediction) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) implied by a network ``output`` at ``x`` = x_t [B, ...]; ``alpha``/``sigma`` broadcast on x."""
    if prediction is Prediction.EPS:
        return output, (x - sigma * output) / alpha
    if prediction is Prediction.V:
        return alpha * output + sigma * x, alpha * x - sigma * output
    if prediction is Prediction.X0:
        return (x - alpha * output) / sigma, output
    raise ValueError(f"unsupported prediction {prediction!r}")


def training_target(prediction: Prediction, x0: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor,
                    sigma: torch.Tensor) -> torch.Tensor:
    """What the network should output for ``x_t = alpha x0 + sigma noise`` [B, ...]."""
    if prediction is Prediction.EPS:
        return noise
    if prediction is Prediction.X0:
        return x0
    if prediction is Prediction.V:
        return alpha * noise - sigma * x0
    raise ValueError(f"unsupported prediction {prediction!r}")

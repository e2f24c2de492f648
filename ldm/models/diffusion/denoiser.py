"""The small interface samplers use to reach a diffusion model: raw output for (x, t, cond), plus its schedule.

Samplers see nothing else of the model, so any network that predicts eps, x0 or v on a discrete DDPM
schedule can be sampled (see ``tests/test_samplers.py`` for a closed-form Gaussian denoiser).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ldm.models.diffusion.parameterization import Prediction


@runtime_checkable
class Denoiser(Protocol):
    """A model-agnostic denoiser: ``denoiser(x [B, ...], t [B], cond) -> raw network output [B, ...]``.

    ``prediction`` says what the output is; ``alphas_cumprod`` [T] (float32) is the discrete schedule the
    timesteps index. ``t`` may hold integer DDPM timesteps or (DPM-Solver) float ones.
    """

    prediction: Prediction
    alphas_cumprod: torch.Tensor

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        ...


class ModelDenoiser:
    """A ``DDPM``/``LatentDiffusion`` seen as a :class:`Denoiser` (calls its ``apply_model``)."""

    def __init__(self, model: Any) -> None:
        for attr in ("apply_model", "alphas_cumprod", "parameterization"):
            if not hasattr(model, attr):
                raise TypeError(f"{type(model).__name__} cannot be sampled: it has no '{attr}' "
                                f"(expected a DDPM / LatentDiffusion model)")
        self.model = model
        self.prediction = Prediction.parse(model.parameterization)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The model's alpha_bar buffer [T] as float32 (also when the model runs in half precision)."""
        return self.model.alphas_cumprod.detach().float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Raw output of the model [B, ...] for x [B, ...], t [B] and its conditioning."""
        return self.model.apply_model(x, t, cond)

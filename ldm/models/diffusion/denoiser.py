"""The small interface samplers use to reach a diffusion model: raw output for (x, t, cond), plus its schedule.

Samplers see nothing else of the model, so any network that predicts eps, x0 or v on a discrete DDPM
schedule can be sampled (see ``tests/test_samplers.py`` for a closed-form Gaussian denoiser).
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from ldm.models.diffusion.parameterization import Prediction
from ldm.models.diffusion.variance import VarianceType, split_output


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
    """A ``DDPM``/``LatentDiffusion`` seen as a :class:`Denoiser` (calls its ``apply_model``).

    Models with a learned variance output 2C channels (mean, then variance values): by default only the mean
    part is returned (what DDIM / PLMS / DPM-Solver use); ``full_output=True`` keeps both halves (ancestral
    sampling with the model's variance).
    """

    def __init__(self, model: Any, full_output: bool = False) -> None:
        for attr in ("apply_model", "alphas_cumprod", "parameterization"):
            if not hasattr(model, attr):
                raise TypeError(f"{type(model).__name__} cannot be sampled: it has no '{attr}' "
                                f"(expected a DDPM / LatentDiffusion model)")
        self.model = model
        self.prediction = Prediction.parse(model.parameterization)
        self.variance = VarianceType.parse(getattr(model, "model_var_type", VarianceType.FIXED_SMALL))
        self.full_output = full_output

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The model's alpha_bar buffer [T] as float32 (also when the model runs in half precision)."""
        return self.model.alphas_cumprod.detach().float()

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Raw output of the model [B, C(, +C), ...] for x [B, C, ...], t [B] and its conditioning."""
        out = self.model.apply_model(x, t, cond)
        if self.full_output:
            return out
        return split_output(out, self.variance, x.shape[1])[0]

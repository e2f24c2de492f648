"""Classifier-free guidance as a wrapper around a denoiser: one batched pass over [uncond; cond]."""
from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.parameterization import Prediction


def concat_conditioning(uncond: Any, cond: Any) -> Any:
    """Batch ``uncond`` before ``cond``: tensors concatenated on dim 0, lists entry-wise, dicts per key."""
    if isinstance(cond, dict):
        if not isinstance(uncond, dict) or set(uncond) != set(cond):
            raise TypeError("dict conditioning needs an unconditional conditioning dict with the same keys, "
                            f"got {type(uncond).__name__}" + (f" with keys {sorted(uncond)}" if isinstance(uncond, dict)
                                                               else ""))
        return {k: concat_conditioning(uncond[k], cond[k]) for k in cond}
    if isinstance(cond, (list, tuple)):
        if not isinstance(uncond, (list, tuple)) or len(uncond) != len(cond):
            raise TypeError("list conditioning needs an unconditional conditioning list of the same length")
        return [concat_conditioning(u, c) for u, c in zip(uncond, cond)]
    if cond is None and uncond is None:
        return None
    if not (torch.is_tensor(cond) and torch.is_tensor(uncond)):
        raise TypeError(f"cannot batch conditioning of types {type(uncond).__name__} and {type(cond).__name__}")
    return torch.cat([uncond, cond])


class ClassifierFreeGuidance:
    """Denoiser wrapper: ``out = out_uc + scale * (out_c - out_uc)`` from ONE call on the doubled batch.

    The batch is ``cat([x, x])``, ``cat([t, t])``, ``[uncond; cond]`` (unconditional first). With
    ``scale == 1`` or no ``uncond`` it makes a single conditional call. Guidance acts on the raw output
    (v for v-models); samplers convert to eps / x0 afterwards. With ``guided_channels`` = C only the first C
    output channels are guided and the rest (the variance half of learned-variance models) is the conditional
    output: extrapolating a variance interpolation value would leave its [-1, 1] range.
    """

    def __init__(self, denoiser: Any, uncond: Any = None, scale: float = 1.0,
                 guided_channels: int | None = None) -> None:
        self.denoiser = denoiser
        self.uncond = uncond
        self.scale = float(scale)
        self.guided_channels = guided_channels

    @property
    def prediction(self) -> Prediction:
        """What the wrapped denoiser predicts."""
        return self.denoiser.prediction

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The wrapped denoiser's schedule [T] (float32)."""
        return self.denoiser.alphas_cumprod

    @property
    def active(self) -> bool:
        """True when a call makes the doubled (guided) pass."""
        return self.uncond is not None and self.scale != 1.0

    def with_scale(self, scale: float) -> "ClassifierFreeGuidance":
        """The same guidance with another scale (for per-step guidance schedules)."""
        return ClassifierFreeGuidance(self.denoiser, self.uncond, scale, self.guided_channels)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Guided raw output [B, ...] for x [B, ...], t [B]."""
        if not self.active or cond is None:
            return self.denoiser(x, t, cond)
        both = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), concat_conditioning(self.uncond, cond))
        out_uc, out_c = both.chunk(2)
        guided = out_uc + self.scale * (out_c - out_uc)
        c = self.guided_channels
        if c is None or c >= out_c.shape[1]:
            return guided
        return torch.cat([guided[:, :c], out_c[:, c:]], dim=1)

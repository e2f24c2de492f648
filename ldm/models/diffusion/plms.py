"""PLMS sampler (pseudo linear multistep, Liu et al. 2022) with the original ``PLMSSampler`` interface."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldm.samplers.legacy import OriginalSampler
from ldm.samplers.original import sample_plms

__all__ = ["PLMSSampler"]


class PLMSSampler(OriginalSampler):
    """``PLMSSampler(model, schedule="linear", device=None)``; deterministic (``eta`` must be 0).

    The first step makes two model calls (pseudo improved Euler), later steps one (Adams-Bashforth 2-4).
    Unlike the SD2 original, v-prediction models are converted to eps before the multistep combination.
    """

    name = "PLMS"
    function = staticmethod(sample_plms)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """As DDIM's; PLMS is deterministic, so ``ddim_eta`` must be 0."""
        if ddim_eta != 0:
            raise ValueError(f"ddim_eta must be 0 for PLMS, got {ddim_eta}")
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=0.0, verbose=verbose)

    def function_kwargs(self, x: torch.Tensor, eta: float, temperature: float, noise_dropout: float,
                        generator: Optional[torch.Generator], quantize_x0: bool, dynamic_threshold: Optional[float],
                        options: dict) -> dict[str, Any]:
        """PLMS takes only the x0 post-processing."""
        return {"denoised_fn": self.denoised_fn(quantize_x0, dynamic_threshold)}

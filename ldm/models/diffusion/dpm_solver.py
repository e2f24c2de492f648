"""DPM-Solver++ (Lu et al. 2022) with the original SD 2 ``DPMSolverSampler`` interface.

A thin class over :func:`ldm.samplers.sample_dpm_solver` on the original's grid: continuous times uniform
from 1 to 1/N (``time_uniform``; ``logSNR``: uniform in log sigma), order 2, first order on the last step for
fewer than 15 steps, one model evaluation per step, no final denoising to t = 0.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldm.samplers.legacy import OriginalSampler
from ldm.samplers.original import sample_dpm_solver
from ldm.samplers.schedules import dpm_solver_sigmas, exponential_sigmas

__all__ = ["DPMSolverSampler"]

SKIP_TYPES = ("time_uniform", "logSNR")


class DPMSolverSampler(OriginalSampler):
    """``DPMSolverSampler(model)``; ``sample(S, batch_size, shape, conditioning, ...)`` with the DDIM signature
    plus ``order`` (1 or 2), ``skip_type`` and ``lower_order_final``."""

    name = "DPM-Solver++"
    function = staticmethod(sample_dpm_solver)

    def check_options(self, eta: float, mask: Any, score_corrector: Any, quantize_x0: bool, kwargs: dict) -> dict:
        """No mask, score corrector or quantisation; reads order / skip_type / lower_order_final."""
        if mask is not None or score_corrector is not None or quantize_x0:
            raise NotImplementedError("DPMSolverSampler supports neither mask, score_corrector nor quantize_x0; "
                                      "use DDIMSampler for those")
        options = {k: kwargs.pop(k) for k in ("order", "skip_type", "lower_order_final") if k in kwargs}
        if options.get("skip_type", "time_uniform") not in SKIP_TYPES:
            raise ValueError(f"unknown skip_type '{options['skip_type']}'; choose one of {', '.join(SKIP_TYPES)}")
        super().check_options(eta, mask, score_corrector, quantize_x0, kwargs)
        return options

    def grid_for_sampling(self, steps: int, options: dict) -> torch.Tensor:
        """The continuous-time grid of ``steps`` steps."""
        acp = self.denoiser.alphas_cumprod
        sigmas = dpm_solver_sigmas(acp, steps)
        if options.get("skip_type", "time_uniform") == "logSNR":
            return exponential_sigmas(steps + 1, float(sigmas[-1]), float(sigmas[0]))[:-1]
        return sigmas

    def function_kwargs(self, x: torch.Tensor, eta: float, temperature: float, noise_dropout: float,
                        generator: Optional[torch.Generator], quantize_x0: bool, dynamic_threshold: Optional[float],
                        options: dict) -> dict[str, Any]:
        """The solver order and whether the last step drops to first order."""
        return {"order": options.get("order", 2), "lower_order_final": options.get("lower_order_final", True)}

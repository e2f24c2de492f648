"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) with a corrector (UniC) that reuses each new model
output, in the data-prediction form, over any sigma schedule (1 model call per step).

As diffusers' ``UniPCMultistepScheduler`` defaults: order 2, the B(h) = e^h - 1 variant ("bh2", or "bh1":
B(h) = h), a warm-up from first order, first order on the last step, no corrector after the last step.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from ldm.samplers.denoiser import DenoiseFn
from ldm.samplers.steps import Callback, call, levels, report


def _lam(sigma: float) -> float:
    return -math.log(sigma) if sigma > 0 else math.inf


def unipc_coefficients(h: float, rks: Sequence[float], order: int, variant: str,
                       corrector: bool) -> tuple[float, float, np.ndarray]:
    """(h phi_1, B(h), rhos) of a UniP (``corrector`` False) or UniC step of ``order`` with step ratios ``rks``
    (those of the older outputs, then 1)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    if variant == "bh1":
        b_h = hh
    elif variant == "bh2":
        b_h = h_phi_1
    else:
        raise ValueError(f"unknown UniPC variant '{variant}'; choose bh1 or bh2")
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    rows, b = [], []
    for i in range(1, order + 1):
        rows.append(np.power(np.asarray(rks, dtype=np.float64), i - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    r, bv = np.stack(rows), np.asarray(b)
    if corrector:
        rhos = np.array([0.5]) if order == 1 else np.linalg.solve(r, bv)
    elif order == 1:
        rhos = np.zeros(0)
    else:
        rhos = np.array([0.5]) if order == 2 else np.linalg.solve(r[:-1, :-1], bv[:-1])
    return h_phi_1, b_h, rhos


def _update(x: torch.Tensor, sigma: float, target: float, outputs: list[torch.Tensor], sigmas: list[float],
            order: int, variant: str, model_t: torch.Tensor | None = None) -> torch.Tensor:
    """x at ``target`` from x at ``sigma`` (= sigmas[-1]) with the latest ``order`` outputs (newest last);
    with ``model_t`` (the output at the target) the UniC correction of that step."""
    if target == 0:
        return outputs[-1] if model_t is None else model_t
    h = _lam(target) - _lam(sigma)
    m0 = outputs[-1]
    rks = [(_lam(sigmas[-1 - k]) - _lam(sigma)) / h for k in range(1, order)] + [1.0]
    d1s = [(outputs[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
    h_phi_1, b_h, rhos = unipc_coefficients(h, rks, order, variant, corrector=model_t is not None)
    x_t = (target / sigma) * x - h_phi_1 * m0
    res = sum(float(rho) * d for rho, d in zip(rhos, d1s)) if d1s else 0.0
    if model_t is not None:
        res = res + float(rhos[-1]) * (model_t - m0)
    return x_t - b_h * res


@torch.no_grad()
def sample_unipc(model: DenoiseFn, x: torch.Tensor, sigmas: Any, callback: Callback = None, order: int = 2,
                 variant: str = "bh2", lower_order_final: bool = True) -> torch.Tensor:
    """UniPC-``order`` over ``sigmas`` (ending at 0 or not)."""
    if order < 1:
        raise ValueError(f"UniPC order must be >= 1, got {order}")
    s = levels(sigmas)
    n = len(s) - 1
    outputs: list[torch.Tensor] = []
    last_x, last_order = None, 0
    for i in range(n):
        denoised = call(model, x, s[i])
        if i > 0:  # correct the predicted x with the output at it (the output itself is kept)
            x = _update(last_x, s[i - 1], s[i], outputs, s[:i], last_order, variant, model_t=denoised)
        outputs = (outputs + [denoised])[-order:]
        step_order = min(order, n - i) if lower_order_final else order
        step_order = min(step_order, i + 1)
        last_x, last_order = x, step_order
        x = _update(x, s[i], s[i + 1], outputs, s[:i + 1], step_order, variant)
        report(callback, i, n, x, s[i], s[i + 1], denoised)
    return x

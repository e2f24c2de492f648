"""UniPC against diffusers' UniPCMultistepScheduler (test-only dependency) on a tiny SD 1 (eps) and SD 2 (v) model:
the same integer-timestep grid (their sigmas), the same start noise, guidance on the raw output."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.denoiser import ModelDenoiser
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.samplers import SigmaDenoiser, sample_unipc
from test_k_samplers import conditioning, reference_model


@pytest.mark.parametrize("config", ["ldm_v1.yaml", "ldm_v2_v.yaml"])
@pytest.mark.parametrize("steps, order, variant, final", [(5, 2, "bh2", "zero"), (6, 3, "bh2", "zero"),
                                                          (4, 1, "bh2", "zero"), (6, 3, "bh1", "sigma_min"),
                                                          (5, 2, "bh1", "sigma_min")])
def test_unipc_equals_diffusers(reference_dir, config: str, steps: int, order: int, variant: str, final: str):
    """(diffusers' bh1 divides 0 by 0 on a last step to sigma 0, so bh1 is compared on a grid ending at sigma_min.)"""
    diffusers = pytest.importorskip("diffusers")
    model = reference_model(config)
    c, uc = conditioning(model, 1)
    raw = ClassifierFreeGuidance(ModelDenoiser(model), uc, 7.5)
    betas = 1 - model.alphas_cumprod.double() / torch.cat([torch.ones(1, dtype=torch.float64),
                                                             model.alphas_cumprod.double()[:-1]])
    scheduler = diffusers.UniPCMultistepScheduler(
        num_train_timesteps=len(betas), trained_betas=betas.numpy(), solver_order=order, solver_type=variant,
        prediction_type="v_prediction" if model.parameterization == "v" else "epsilon", lower_order_final=True, final_sigmas_type=final)
    scheduler.set_timesteps(steps)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    x = x_T * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(raw(x, t.reshape(1).float(), c), t, x).prev_sample
    sigmas = torch.as_tensor(np.asarray(scheduler.sigmas), dtype=torch.float64)
    assert (sigmas[-1] == 0) == (final == "zero") and len(sigmas) == steps + 1
    ours = sample_unipc(SigmaDenoiser(raw).bind(c), x_T * float((1 + sigmas[0] ** 2).sqrt()), sigmas,
                        order=order, variant=variant) / float((1 + sigmas[-1] ** 2).sqrt())
    err, scale = (ours - x).abs().max().item(), x.abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), f"max abs diff {err:.3g} (output scale {scale:.3g})"

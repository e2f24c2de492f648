"""Schedules: reference parity (beta schedules, DDPM buffers, DDIM and DPM-Solver grids) and their rules."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm.models.diffusion.ddpm import DDPM
from ldm.samplers.schedules import ddim_sigmas, dpm_solver_sigmas, model_sigmas, sigma_to_t
from ldm.modules.diffusionmodules.schedules import (DDPM_BUFFER_NAMES, ddpm_schedule, lvlb_weights,
                                                    make_beta_schedule, make_ddim_sampling_parameters,
                                                    make_ddim_timesteps, min_snr_weights)

NET = {"target": "torch.nn.Identity"}  # the schedule does not depend on the network


def tiny_ddpm(**kw) -> DDPM:
    return DDPM(unet_config=NET, use_ema=False, **kw)


@pytest.fixture
def case(reference_dir):
    """(params, io tensors, check(key, value)) of the reference case "schedules"."""
    root = reference_dir
    spec = next(c for c in json.load(open(root / "cases.json")) if c["name"] == "schedules")
    io = load_file(str(root / spec["io"]))

    def check(key, got):
        tol = spec.get("tolerances", {}).get(key, {"atol": spec["atol"], "rtol": spec["rtol"]})
        want = io[key]
        got = torch.as_tensor(np.asarray(got) if not torch.is_tensor(got) else got)
        assert tuple(got.shape) == tuple(want.shape), key
        torch.testing.assert_close(got.double(), want.double(), **tol, msg=key)
    return spec["params"], io, check


def test_reference_beta_schedules(case):
    p, _, check = case
    for key in ("linear", "linear_default"):
        q = p[key]
        check(f"{key}_betas", make_beta_schedule("linear", q["n"], linear_start=q["linear_start"],
                                                 linear_end=q["linear_end"]))
    check("cosine_betas", make_beta_schedule("cosine", p["cosine"]["n"], cosine_s=p["cosine"]["cosine_s"]))


@pytest.mark.parametrize("schedule,prefix", [("linear", "ddpm_"), ("cosine", "ddpm_cosine_")])
def test_reference_ddpm_buffers(case, schedule, prefix):
    p, io, check = case
    lin = p["linear"]
    model = tiny_ddpm(beta_schedule=schedule, timesteps=lin["n"], linear_start=lin["linear_start"],
                      linear_end=lin["linear_end"], cosine_s=p["cosine"]["cosine_s"])
    buffers = dict(model.named_buffers())
    keys = [k for k in io if k.startswith(prefix) and not (prefix == "ddpm_" and k.startswith("ddpm_cosine_"))]
    assert len(keys) == 13
    for key in keys:
        check(key, buffers[key[len(prefix):]])


def test_reference_ddim_parameters(case):
    from ldm.models.diffusion.ddim import DDIMSampler
    p, io, check = case
    lin = p["linear"]
    model = tiny_ddpm(timesteps=lin["n"], linear_start=lin["linear_start"], linear_end=lin["linear_end"])
    for s in p["ddim_steps"]:
        check(f"ddim_timesteps_{s}", make_ddim_timesteps("uniform", s, lin["n"], verbose=False))
        for eta in p["etas"]:
            sampler = DDIMSampler(model)
            sampler.make_schedule(ddim_num_steps=s, ddim_eta=eta, verbose=False)
            e = f"{eta:g}".replace(".", "p")
            for attr, dtype in (("ddim_alphas", np.float32), ("ddim_alphas_prev", np.float64),
                                ("ddim_sigmas", np.float64), ("ddim_sqrt_one_minus_alphas", np.float32)):
                value = getattr(sampler, attr)
                assert isinstance(value, np.ndarray) and value.dtype == dtype, attr
                check(f"{attr}_{s}_eta{e}", value)


@pytest.mark.parametrize("n", [10, 20])
def test_reference_dpm_solver_grid(case, n):
    p, io, check = case
    lin = p["linear"]
    acp = tiny_ddpm(timesteps=lin["n"], linear_start=lin["linear_start"], linear_end=lin["linear_end"]).alphas_cumprod
    sigmas = dpm_solver_sigmas(acp, n)  # in the sigma parameterisation: sigma_t / alpha_t
    alpha = (1 + sigmas ** 2).rsqrt()
    check(f"dpm_alpha_t_{n}", alpha)
    check(f"dpm_sigma_t_{n}", sigmas * alpha)
    check(f"dpm_lambda_t_{n}", -sigmas.log())
    # the model's fractional timestep of each level (log-sigma interpolation) is within 0.01 of the original's
    # (t - 1/N) * 1000 (log-alpha interpolation in continuous time)
    t = sigma_to_t(sigmas, model_sigmas(acp).log())
    torch.testing.assert_close(t, io[f"dpm_model_input_t_{n}"].double(), atol=0.01, rtol=0)


def test_cosine_schedule_formula():
    s, n = 0.008, 1000
    betas = make_beta_schedule("cosine", n, cosine_s=s)
    f = lambda t: math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    expected = np.array([f(t) / f(0) for t in range(1, n + 1)])
    acp = np.cumprod(1 - betas)
    np.testing.assert_allclose(acp[:-1], expected[:-1], rtol=1e-10, atol=1e-12)
    assert betas.max() <= 0.999 and betas[-1] == pytest.approx(0.999)  # the clip at the end of the chain


def test_linear_is_linear_in_sqrt_beta():
    betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
    np.testing.assert_allclose(np.diff(np.sqrt(betas)), (0.012 ** 0.5 - 0.00085 ** 0.5) / 999, rtol=1e-9)
    np.testing.assert_allclose(np.diff(make_beta_schedule("sqrt_linear", 10)), (2e-2 - 1e-4) / 9, rtol=1e-9)


@pytest.mark.parametrize("steps", [3, 9, 27, 36, 37, 101, 333, 501, 1000])
def test_ddim_step_counts_the_original_crashes_on(steps):
    ts = make_ddim_timesteps("uniform", steps, 1000, verbose=False)
    assert ts[0] == 1 and ts.max() < 1000 and np.all(np.diff(ts) > 0)
    assert len(ts) == len(range(0, 1000, 1000 // steps)) - 1  # the grid point that reaches 1000 is dropped
    if 1000 % steps == 1 or steps in (3, 9, 27):
        assert len(ts) == steps
    sigmas = ddim_sigmas(tiny_ddpm().alphas_cumprod, steps)
    assert len(sigmas) == len(ts) + 1 and torch.isfinite(sigmas).all() and (sigmas.diff() < 0).all()


@pytest.mark.parametrize("steps,count", [(10, 10), (30, 31), (11, 12), (12, 13)])
def test_ddim_grid_matches_original_counts(steps, count):
    ts = make_ddim_timesteps("uniform", steps, 1000, verbose=False)
    assert len(ts) == count and ts[0] == 1 and ts[1] == 1 + 1000 // steps


def test_ddim_parameters_first_alpha_prev_and_sigma_formula():
    acp = tiny_ddpm().alphas_cumprod.numpy()
    ts = make_ddim_timesteps("uniform", 10, 1000, verbose=False)
    sigmas, alphas, prev = make_ddim_sampling_parameters(acp, ts, eta=1.0, verbose=False)
    assert prev[0] == acp[0] and np.array_equal(prev[1:], acp[ts[:-1]].astype(np.float64))
    np.testing.assert_allclose(sigmas ** 2, (1 - prev) / (1 - alphas) * (1 - alphas / prev), rtol=1e-6)


def test_ddpm_schedule_identities():
    betas = make_beta_schedule("linear", 100, linear_start=1e-3, linear_end=5e-2)
    sch = ddpm_schedule(betas)
    assert tuple(sch) == DDPM_BUFFER_NAMES and all(v.dtype == np.float64 for v in sch.values())
    acp, prev = sch["alphas_cumprod"], sch["alphas_cumprod_prev"]
    assert prev[0] == 1.0 and np.allclose(prev[1:], acp[:-1])
    # the posterior variance equals 1 / (1 / (1 - acp_prev) + alpha / beta) (where defined)
    pv = 1 / (1 / (1 - prev[1:]) + (1 - betas[1:]) / betas[1:])
    np.testing.assert_allclose(sch["posterior_variance"][1:], pv, rtol=1e-10)
    assert sch["posterior_variance"][0] == 0 and sch["posterior_log_variance_clipped"][0] == np.log(1e-20)
    np.testing.assert_allclose(ddpm_schedule(betas, v_posterior=1.0)["posterior_variance"], betas)


def test_lvlb_weights_by_parameterization():
    sch = ddpm_schedule(make_beta_schedule("linear", 50))
    eps = lvlb_weights(sch, "eps")
    assert eps.dtype == torch.float32 and eps[0] == eps[1] and torch.isfinite(eps).all()
    assert torch.equal(lvlb_weights(sch, "v"), torch.ones(50))
    assert lvlb_weights(sch, "x0")[0] == lvlb_weights(sch, "x0")[1]
    with pytest.raises(ValueError, match="parameterization"):
        lvlb_weights(sch, "score")


def test_given_betas_and_bad_schedule():
    model = tiny_ddpm(given_betas=[0.1, 0.2, 0.3])
    assert model.num_timesteps == 3 and torch.allclose(model.betas, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="beta schedule"):
        tiny_ddpm(beta_schedule="quadratic")


def test_min_snr_weights_are_one_x0_space_weighting():
    """eps, x0 and v losses weighted by min_snr_weights all equal min(SNR, gamma) times the x0 error."""
    acp = torch.tensor(ddpm_schedule(make_beta_schedule("linear", 1000, 0.00085, 0.012), 0.0)["alphas_cumprod"])
    snr = acp / (1 - acp)
    x0_error_scale = {"eps": snr, "x0": torch.ones_like(snr), "v": snr + 1}  # network loss / x0 loss
    for name, scale in x0_error_scale.items():
        weights = min_snr_weights(acp, name, 5.0)
        torch.testing.assert_close(weights * scale, torch.clamp(snr, max=5.0))
    v = min_snr_weights(acp, "v", 5.0)
    assert v.argmax() == int((snr - 5.0).abs().argmin()) and float(v.max()) == pytest.approx(5 / 6, rel=1e-2)
    with pytest.raises(ValueError, match="snr_gamma must be positive"):
        min_snr_weights(acp, "v", 0.0)
    with pytest.raises(ValueError, match="unknown parameterization"):
        min_snr_weights(acp, "score", 5.0)

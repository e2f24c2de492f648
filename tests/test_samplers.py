"""Samplers: reference parity (DDIM, PLMS, DPM-Solver, img2img; eps and v), an exact Gaussian target,
classifier-free guidance batching, and the cases the original crashes on."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.guidance import ClassifierFreeGuidance, concat_conditioning
from ldm.models.diffusion.parameterization import Prediction
from ldm.models.diffusion.plms import PLMSSampler
from ldm.modules.diffusionmodules.schedules import make_beta_schedule

from conftest import reference_oracle


# ---------------------------------------------------------------- reference cases

@functools.lru_cache(maxsize=None)
def _model(root: str, config: str, weights: str):
    check = reference_oracle(root)
    spec = next(c for c in json.load(open(Path(root) / "cases.json")) if c.get("config") == config)
    return check.Case(dict(spec, weights=weights), Path(root)).build()


def _case(reference_dir: Path, name: str):
    spec = next(c for c in json.load(open(reference_dir / "cases.json")) if c["name"] == name)
    check = reference_oracle(str(reference_dir))
    case = check.Case(spec, reference_dir)
    return check, case, _model(str(reference_dir), spec["config"], spec["weights"])


def _assert_outputs(check, case, results: dict) -> None:
    compared = 0
    for key, value in results.items():
        if key in case.io and key in case.spec["outputs"]:
            msg = check.compare(key, value, case.io[key], case.tol(key))
            assert msg is None, f"{case.spec['name']}: {msg}"
            compared += 1
    assert compared, "nothing compared"


@pytest.mark.parametrize("name,cls", [("ldm_v2_eps_ddim", DDIMSampler), ("ldm_v2_eps_ddim_eta1", DDIMSampler),
                                      ("ldm_v2_eps_plms", PLMSSampler), ("ldm_v2_eps_dpm", DPMSolverSampler),
                                      ("ldm_v2_v_ddim", DDIMSampler), ("ldm_v2_v_dpm", DPMSolverSampler)])
def test_reference_sampling(reference_dir, name, cls):
    check, case, model = _case(reference_dir, name)
    io, args = case.io, case.spec["args"]
    eta = args.get("eta", 0.0)
    with check.scripted_noise(list(io["noises"]) if "noises" in io else []) as left:
        samples, _ = cls(model).sample(S=args["S"], batch_size=args["batch_size"], shape=args["shape"],
                                       conditioning=io["c"], eta=eta, x_T=io["x_T"], verbose=False,
                                       unconditional_guidance_scale=args["unconditional_guidance_scale"],
                                       unconditional_conditioning=io["uc"])
    assert not left, "the scripted eta noise was not drawn once per step"
    _assert_outputs(check, case, {"samples": samples})


def test_reference_img2img(reference_dir):
    check, case, model = _case(reference_dir, "ldm_v2_eps_img2img")
    io, args = case.io, case.spec["args"]
    with check.scripted_noise([io["posterior_noise"]]):
        z0 = model.get_first_stage_encoding(model.encode_first_stage(io["init_image"]))
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=args["ddim_steps"], ddim_eta=0.0, verbose=False)
    t_enc = int(args["strength"] * args["ddim_steps"])
    z = sampler.stochastic_encode(z0, torch.tensor([t_enc] * z0.shape[0]), noise=io["enc_noise"])
    samples = sampler.decode(z, io["c"], t_enc, unconditional_guidance_scale=args["unconditional_guidance_scale"],
                             unconditional_conditioning=io["uc"])
    _assert_outputs(check, case, {"init_latent": z0, "z_enc": z, "samples": samples,
                                  "t_enc": torch.tensor(t_enc)})


# ---------------------------------------------------------------- an exact Gaussian denoiser

class GaussianModel(nn.Module):
    """Stand-in diffusion model whose data are x0 ~ N(mu, s^2) iid: its eps / x0 / v denoiser is exact.

    For x_t = a x0 + sigma eps: E[eps | x_t] = sigma (x_t - a mu) / (a^2 s^2 + sigma^2) and
    E[x0 | x_t] = mu + a s^2 (x_t - a mu) / (a^2 s^2 + sigma^2). Float timesteps interpolate log sigma / alpha
    (the samplers' convention, k-diffusion's).
    """

    def __init__(self, mu: float = 0.5, s: float = 1.0, parameterization: str = "eps") -> None:
        super().__init__()
        betas = make_beta_schedule("linear", 1000, linear_start=0.00085, linear_end=0.012)
        self.register_buffer("alphas_cumprod", torch.tensor(np.cumprod(1 - betas), dtype=torch.float32))
        self.num_timesteps, self.parameterization, self.mu, self.s = 1000, parameterization, mu, s
        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_s = (0.5 * ((1 - self.alphas_cumprod.double()) / self.alphas_cumprod.double()).log())
        t = t.double().clamp(0, self.num_timesteps - 1)
        i = t.floor().long().clamp(max=self.num_timesteps - 2)
        s = (log_s[i] + (t - i) * (log_s[i + 1] - log_s[i])).exp()
        a = (1 + s * s).rsqrt()
        return a, s * a

    def marginal(self, t: float, n: int, generator: torch.Generator) -> torch.Tensor:
        """n x [1, 8, 8] draws of x_t at timestep t."""
        a, sigma = self.alpha_sigma(torch.tensor([float(t)]))
        z = torch.randn(n, 1, 8, 8, generator=generator, dtype=torch.float64)
        return (a * self.mu + (a * a * self.s ** 2 + sigma * sigma).sqrt() * z).float()

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: object) -> torch.Tensor:
        self.calls.append((x, t, cond))
        a, sigma = (v.view(-1, *([1] * (x.dim() - 1))) for v in self.alpha_sigma(t))
        var = a * a * self.s ** 2 + sigma * sigma
        eps = sigma * (x.double() - a * self.mu) / var
        x0 = self.mu + a * self.s ** 2 * (x.double() - a * self.mu) / var
        return {"eps": eps, "x0": x0, "v": a * eps - sigma * x0}[self.parameterization].to(x.dtype)


def _final_moments(model: GaussianModel) -> tuple[float, float]:
    acp0 = float(model.alphas_cumprod[0])  # samplers stop at the noise level of t = 0, as the original
    return acp0 ** 0.5 * model.mu, acp0 * model.s ** 2 + 1 - acp0


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_gaussian_target_mean_and_variance(eta):
    """DDIM with many steps (eta 0: the ODE; eta 1: ancestral) draws N(mu, s^2) within sampling error."""
    model = GaussianModel(mu=0.5, s=1.0)
    g = torch.Generator().manual_seed(1)
    sampler = DDIMSampler(model)
    sampler.make_schedule(250, ddim_eta=eta, verbose=False)
    x_T = model.marginal(int(sampler.ddim_timesteps[-1]), 256, g)
    out, _ = sampler.sample(S=250, batch_size=256, shape=[1, 8, 8], x_T=x_T, eta=eta, verbose=False, generator=g)
    mean, var = _final_moments(model)
    n = out.numel()
    assert abs(out.mean().item() - mean) < 4 * (var / n) ** 0.5
    assert abs(out.var().item() / var - 1) < 4 * (2 / n) ** 0.5


def _affine_error(cls, steps, param="eps", s=0.3, **kw) -> tuple[float, float]:
    """(mean error, relative variance error) of a deterministic sampler's map on the exact marginals.

    With a Gaussian target every step is affine in x, so the output moments follow from two runs
    (x_T = 0 and 1) without sampling noise.
    """
    model = GaussianModel(mu=0.5, s=s, parameterization=param)
    sampler = cls(model)
    start = 999
    if cls is not DPMSolverSampler:
        sampler.make_schedule(steps, verbose=False)
        start = int(sampler.ddim_timesteps[-1])
    out, _ = sampler.sample(S=steps, batch_size=2, shape=[1, 1, 1], x_T=torch.tensor([0.0, 1.0]).view(2, 1, 1, 1),
                            verbose=False, **kw)
    a, sigma = model.alpha_sigma(torch.tensor([float(start)]))
    gain, offset = (out[1] - out[0]).item(), out[0].item()
    mean, var = _final_moments(model)
    return gain * (a * model.mu).item() + offset - mean, gain ** 2 * (a * a * s ** 2 + sigma * sigma).item() / var - 1


@pytest.mark.parametrize("cls,steps,param,kw,tol", [
    (DDIMSampler, 500, "eps", {}, 0.02), (DDIMSampler, 500, "v", {}, 0.02), (DDIMSampler, 500, "x0", {}, 0.02),
    (PLMSSampler, 100, "eps", {}, 2e-3), (PLMSSampler, 100, "v", {}, 2e-3),
    (DPMSolverSampler, 50, "v", {"skip_type": "logSNR"}, 3e-3), (DPMSolverSampler, 200, "eps", {}, 0.03)])
def test_gaussian_target_exact_moments(cls, steps, param, kw, tol):
    mean_err, var_err = _affine_error(cls, steps, param, **kw)
    assert abs(mean_err) < 1e-4 and abs(var_err) < tol


def test_dpm_solver_is_second_order():
    errors = [abs(_affine_error(DPMSolverSampler, s, skip_type="logSNR")[1]) for s in (25, 50, 100)]
    assert 3.0 < errors[0] / errors[1] < 5.0 and 3.0 < errors[1] / errors[2] < 5.0


# ---------------------------------------------------------------- guidance

class Recorder:
    """Denoiser that records its calls and returns a linear function of x and the conditioning."""

    prediction = Prediction.EPS
    alphas_cumprod = torch.linspace(0.99, 0.01, 1000)

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, object]] = []

    def __call__(self, x, t, cond):
        self.calls.append((x, t, cond))
        c = cond["c_crossattn"][0] if isinstance(cond, dict) else cond
        return 2 * x + c.mean(dim=(1, 2)).view(-1, 1, 1, 1)


def test_guidance_one_batched_call_uncond_first():
    rec = Recorder()
    x, t = torch.randn(2, 4, 3, 3), torch.tensor([5, 5])
    c, uc = torch.ones(2, 7, 8), torch.zeros(2, 7, 8)
    out = ClassifierFreeGuidance(rec, uc, 7.5)(x, t, c)
    assert len(rec.calls) == 1
    bx, bt, bc = rec.calls[0]
    assert torch.equal(bx, torch.cat([x, x])) and torch.equal(bt, torch.cat([t, t]))
    assert torch.equal(bc, torch.cat([uc, c]))  # unconditional first
    torch.testing.assert_close(out, 2 * x + 0.0 + 7.5 * (1.0 - 0.0))


def test_guidance_leaves_the_variance_half_conditional():
    rec = Recorder()
    x = torch.randn(2, 6, 3, 3)  # 3 mean channels + 3 learned-variance channels
    c, uc = torch.ones(2, 7, 8), torch.zeros(2, 7, 8)
    guide = ClassifierFreeGuidance(rec, uc, 7.5, guided_channels=3)
    out = guide(x, torch.tensor([5, 5]), c)
    torch.testing.assert_close(out[:, :3], 2 * x[:, :3] + 7.5)  # guided
    torch.testing.assert_close(out[:, 3:], 2 * x[:, 3:] + 1.0)  # the conditional output as it is
    assert guide.with_scale(2.0).guided_channels == 3


@pytest.mark.parametrize("scale,uc", [(1.0, torch.zeros(2, 7, 8)), (7.5, None)])
def test_guidance_single_conditional_call(scale, uc):
    rec = Recorder()
    x, c = torch.randn(2, 4, 3, 3), torch.ones(2, 7, 8)
    out = ClassifierFreeGuidance(rec, uc, scale)(x, torch.tensor([1, 1]), c)
    assert len(rec.calls) == 1 and rec.calls[0][0].shape[0] == 2 and rec.calls[0][2] is c
    torch.testing.assert_close(out, 2 * x + 1.0)


def test_concat_conditioning_dict_and_list():
    c = {"c_crossattn": [torch.ones(2, 3, 4)], "c_concat": [torch.ones(2, 1, 5, 5), 2 * torch.ones(2, 1, 5, 5)]}
    uc = {"c_crossattn": [torch.zeros(2, 3, 4)], "c_concat": [torch.zeros(2, 1, 5, 5), torch.zeros(2, 1, 5, 5)]}
    both = concat_conditioning(uc, c)
    assert both["c_crossattn"][0].shape == (4, 3, 4) and both["c_crossattn"][0][:2].eq(0).all()
    assert len(both["c_concat"]) == 2 and both["c_concat"][1][2:].eq(2).all() and both["c_concat"][1][:2].eq(0).all()
    with pytest.raises(TypeError, match="same keys"):
        concat_conditioning({"c_crossattn": [torch.zeros(2, 3, 4)]}, c)


def test_v_guidance_acts_on_raw_output():
    model = GaussianModel(parameterization="v")
    sampler = DDIMSampler(model)
    x_T = torch.randn(2, 1, 8, 8)
    out_a, _ = sampler.sample(S=5, batch_size=2, shape=[1, 8, 8], x_T=x_T, verbose=False,
                              conditioning=torch.ones(2, 3), unconditional_conditioning=torch.zeros(2, 3),
                              unconditional_guidance_scale=3.0)
    assert all(x.shape[0] == 4 for x, _, _ in model.calls)  # one doubled call per step
    out_b, _ = sampler.sample(S=5, batch_size=2, shape=[1, 8, 8], x_T=x_T, verbose=False)
    torch.testing.assert_close(out_a, out_b)  # a conditioning-free model: guidance changes nothing


# ---------------------------------------------------------------- sampler behaviour

@pytest.mark.parametrize("steps", [3, 9, 27])
def test_step_counts_the_original_crashes_on(steps):
    model = GaussianModel()
    seen = []
    out, inter = DDIMSampler(model).sample(S=steps, batch_size=2, shape=[1, 8, 8], verbose=False,
                                           callback=seen.append)
    assert len(model.calls) == steps and seen == list(range(steps)) and torch.isfinite(out).all()
    assert int(model.calls[0][1][0]) == 1 + (steps - 1) * (1000 // steps)


def test_model_call_counts_and_timesteps():
    model = GaussianModel()
    PLMSSampler(model).sample(S=10, batch_size=1, shape=[1, 8, 8], verbose=False)
    ts = [int(t[0]) for _, t, _ in model.calls]
    assert ts == [901, 801] + list(range(801, 0, -100))  # pseudo improved Euler first: two calls
    model.calls.clear()
    DPMSolverSampler(model).sample(S=10, batch_size=1, shape=[1, 8, 8], verbose=False)
    ts = [float(t[0]) for _, t, _ in model.calls]
    assert len(ts) == 10 and ts[0] == 999.0 and all(t.dtype == torch.float32 for _, t, _ in model.calls)
    with pytest.raises(ValueError, match="eta"):
        PLMSSampler(model).sample(S=10, batch_size=1, shape=[1, 8, 8], eta=0.5, verbose=False)


def test_generator_reproducible_and_device_following():
    model = GaussianModel()
    run = lambda seed: DDIMSampler(model).sample(S=8, batch_size=2, shape=[1, 8, 8], eta=1.0, verbose=False,  # noqa
                                                 generator=torch.Generator().manual_seed(seed))[0]
    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


def test_img2img_strength_one_runs_whole_schedule():
    model = GaussianModel()
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    z0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    z = sampler.stochastic_encode(z0, torch.tensor([10, 10]), noise=noise)  # t_enc == S (the original: IndexError)
    a = float(sampler.ddim_alphas[-1])
    torch.testing.assert_close(z, a ** 0.5 * z0 + float(sampler.ddim_sqrt_one_minus_alphas[-1]) * noise)
    out = sampler.decode(z, None, 10)
    assert [int(t[0]) for _, t, _ in model.calls] == list(range(901, 0, -100)) and torch.isfinite(out).all()


def test_img2img_strength_convention():
    model = GaussianModel()
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=10, verbose=False)
    sampler.decode(torch.randn(1, 1, 8, 8), None, 6)
    assert [int(t[0]) for _, t, _ in model.calls] == [501, 401, 301, 201, 101, 1]  # one step below t_enc's level


def test_callbacks_intermediates_and_mask():
    model = GaussianModel()
    pred = []
    x0 = torch.full((1, 1, 8, 8), 3.0)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    out, inter = DDIMSampler(model).sample(S=10, batch_size=1, shape=[1, 8, 8], verbose=False, mask=mask, x0=x0,
                                           img_callback=lambda p, i: pred.append(i), log_every_t=5)
    assert pred == list(range(10)) and len(inter["x_inter"]) == len(inter["pred_x0"]) == 4
    assert (out[..., :4] - 3.0).abs().max() < 0.5  # the kept region follows x0


def test_ucg_schedule_per_step_scales():
    model = GaussianModel()
    scales = [1.0, 2.0, 1.0, 3.0, 1.0]
    DDIMSampler(model).sample(S=5, batch_size=2, shape=[1, 8, 8], verbose=False, conditioning=torch.ones(2, 3),
                              unconditional_conditioning=torch.zeros(2, 3), ucg_schedule=scales)
    assert [x.shape[0] for x, _, _ in model.calls] == [2, 4, 2, 4, 2]
    with pytest.raises(ValueError, match="ucg_schedule"):
        DDIMSampler(model).sample(S=5, batch_size=2, shape=[1, 8, 8], verbose=False, ucg_schedule=[1.0])


def test_dynamic_threshold_caps_pred_x0_rms():
    model = GaussianModel(mu=3.0)
    rms = []
    DDIMSampler(model).sample(S=5, batch_size=2, shape=[1, 8, 8], verbose=False, dynamic_threshold=1.5,
                              img_callback=lambda x0, i: rms.append(x0.pow(2).flatten(1).mean(1).sqrt().max().item()))
    assert len(rms) == 5 and max(rms) <= 1.5 + 1e-5
    with pytest.raises(ValueError, match="quantize"):
        DDIMSampler(model).sample(S=5, batch_size=1, shape=[1, 8, 8], verbose=False, quantize_x0=True)
    with pytest.raises(NotImplementedError, match="mask"):
        DPMSolverSampler(model).sample(S=5, batch_size=1, shape=[1, 8, 8], verbose=False, mask=torch.ones(1))

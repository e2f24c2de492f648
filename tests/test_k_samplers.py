"""The sampler functions against the k-diffusion package itself (0.1.1, test-only dependency) on tiny SD 1 (eps)
and SD 2 (v) models and on the shipped default model: same model, same start noise ``x_T * sigmas[0]``, guidance
``uncond + scale * (cond - uncond)`` on the denoised output, the same scripted noise for the stochastic ones."""
from __future__ import annotations

import functools
import json
from typing import Any

import pytest
import torch

import ldm.samplers as S
from conftest import REFERENCE, reference_oracle
from kdiffusion_oracle import load_k_diffusion
from ldm.samplers import schedules
from ldm.samplers.denoiser import SigmaDenoiser
from ldm.models.diffusion.denoiser import ModelDenoiser
from ldm.models.diffusion.guidance import ClassifierFreeGuidance

SCALE = 7.5
DETERMINISTIC = ["euler", "heun", "dpm_2", "lms", "dpmpp_2m"]
STOCHASTIC = ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde",
              "dpmpp_3m_sde"]


@functools.lru_cache(maxsize=None)
def reference_model(config: str) -> Any:
    """A tiny LatentDiffusion of the reference cases (SD 1 eps: ldm_v1.yaml; SD 2 v: ldm_v2_v.yaml)."""
    cases = json.load(open(REFERENCE / "cases.json"))
    spec = next(c for c in cases if c.get("config") == config and c["kind"] == "latent_diffusion")
    return reference_oracle(str(REFERENCE)).Case(spec, REFERENCE).build()


@functools.lru_cache(maxsize=None)
def default_model() -> Any:
    from ldm.inference import loading

    source = loading.resolve_source(None, None)
    return loading.load_model(source, loading.read_config(source.config_path), None, None, "cpu")


def conditioning(model: Any, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        c = model.get_learned_conditioning(["a red circle on a blue background"] * batch)
        uc = model.get_learned_conditioning([""] * batch)
    return c, uc


def k_model(model: Any, c: torch.Tensor, uc: torch.Tensor) -> Any:
    """k-diffusion's CompVis(V)Denoiser (quantize=False) with classifier-free guidance on its denoised output."""
    _, external = load_k_diffusion()
    cls = external.CompVisVDenoiser if model.parameterization == "v" else external.CompVisDenoiser
    den = cls(model, quantize=False)

    def fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        out = den(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([uc, c]))
        u, cc = out.chunk(2)
        return u + SCALE * (cc - u)
    fn.inner = den
    return fn


def our_model(model: Any, c: torch.Tensor, uc: torch.Tensor) -> Any:
    return SigmaDenoiser(ClassifierFreeGuidance(ModelDenoiser(model), uc, SCALE)).bind(c)


def k_sigmas(kmodel: Any, schedule: str, n: int) -> torch.Tensor:
    sampling, _ = load_k_diffusion()
    den = kmodel.inner
    lo, hi = float(den.sigma_min), float(den.sigma_max)
    if schedule == "normal":
        return den.get_sigmas(n)
    if schedule == "karras":
        return sampling.get_sigmas_karras(n, lo, hi, rho=7.0)
    return sampling.get_sigmas_exponential(n, lo, hi)


def scripted(noises: list[torch.Tensor]) -> Any:
    it = iter(noises)
    return lambda sigma, sigma_next: next(it).clone()


def compare(model: Any, name: str, schedule: str, steps: int, shape: tuple[int, ...]) -> tuple[float, float]:
    """(max |ours - k-diffusion|, max |k-diffusion|) of one sampler run."""
    sampling, _ = load_k_diffusion()
    c, uc = conditioning(model, shape[0])
    kmodel = k_model(model, c, uc)
    ksig = k_sigmas(kmodel, schedule, steps)
    ours_sig = schedules.make_sigmas(schedule, model.alphas_cumprod, steps)
    torch.testing.assert_close(ours_sig.float(), ksig.float(), rtol=1e-5, atol=1e-6)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(8)
    noises = [torch.randn(shape, generator=g) for _ in range(2 * steps)]
    ours_kw, k_kw = ({"noise": scripted(noises)}, {"noise_sampler": scripted(noises)}) if name in STOCHASTIC \
        else ({}, {})
    ours = getattr(S, f"sample_{name}")(our_model(model, c, uc), x_T * float(ours_sig[0]), ours_sig, **ours_kw)
    with torch.no_grad():
        theirs = getattr(sampling, f"sample_{name}")(kmodel, x_T * ksig[0], ksig, disable=True, **k_kw)
    return (ours - theirs).abs().max().item(), theirs.abs().max().item()


CASES = [(name, schedule) for name, schedule in zip(DETERMINISTIC + STOCHASTIC,
                                                        ["normal", "karras", "exponential"] * 4)]


@pytest.mark.parametrize("config", ["ldm_v1.yaml", "ldm_v2_v.yaml"])
@pytest.mark.parametrize("name,schedule", CASES)
def test_equals_k_diffusion_on_tiny_sd1_eps_and_sd2_v(reference_dir, config: str, name: str, schedule: str):
    err, scale = compare(reference_model(config), name, schedule, steps=3, shape=(1, 4, 8, 8))
    assert err <= 1e-4 * max(scale, 1.0), f"{name}/{schedule}: max abs diff {err:.3g} (output scale {scale:.3g})"


@pytest.mark.parametrize("name,schedule", [("euler", "karras"), ("heun", "normal"), ("dpm_2", "exponential"),
                                           ("lms", "karras"), ("dpmpp_2m", "karras")])
def test_equals_k_diffusion_on_the_default_model(name: str, schedule: str):
    err, scale = compare(default_model(), name, schedule, steps=3, shape=(1, 4, 16, 16))
    assert err <= 1e-4 * max(scale, 1.0), f"{name}/{schedule}: max abs diff {err:.3g} (output scale {scale:.3g})"


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_2m_sde",
                                  "dpmpp_3m_sde"])
def test_eta_zero_makes_a_stochastic_sampler_deterministic(reference_dir, name: str):
    """eta 0: no fresh noise; "Euler a" then equals "Euler" bit for bit."""
    model = reference_model("ldm_v1.yaml")
    c, uc = conditioning(model, 2)
    sig = schedules.make_sigmas("karras", model.alphas_cumprod, 4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * float(sig[0])
    refuse = lambda a, b: pytest.fail("eta 0 drew noise")  # noqa: E731
    out = getattr(S, f"sample_{name}")(our_model(model, c, uc), x, sig, noise=refuse, eta=0.0)
    if name == "euler_ancestral":
        assert torch.equal(out, S.sample_euler(our_model(model, c, uc), x, sig))
    assert torch.isfinite(out).all()


def test_ddim_over_any_schedule_is_euler(reference_dir):
    """DDIM (eta 0) in the sigma parameterisation is the Euler step: x' = D + sigma' eps = x + (sigma' - sigma) d."""
    model = reference_model("ldm_v2_v.yaml")
    c, uc = conditioning(model, 2)
    sig = schedules.make_sigmas("karras", model.alphas_cumprod, 5)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * float(sig[0])
    torch.testing.assert_close(S.sample_ddim(our_model(model, c, uc), x, sig),
                               S.sample_euler(our_model(model, c, uc), x, sig), rtol=1e-5, atol=1e-5)

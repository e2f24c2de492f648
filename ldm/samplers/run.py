"""Running a chosen sampler on a model: its sigmas, the start (txt2img noise or img2img's noised init), the
noise source, and the conversion of the result back to the model's latents."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ldm.samplers.denoiser import DenoiseFn, SigmaDenoiser
from ldm.samplers.noise import Generators, make_noise
from ldm.samplers.registry import SamplerChoice
from ldm.samplers.schedules import make_sigmas
from ldm.samplers.steps import Callback


def sigmas_for(choice: SamplerChoice, alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """The full schedule of a run of ``steps`` steps on a model's ``alphas_cumprod`` [T] (the web UI's: DPM2 and
    3M SDE drop the next-to-last sigma of steps + 1)."""
    if choice.spec.discard_penultimate and choice.schedule not in ("ddim", "dpm_solver"):
        sigmas = make_sigmas(choice.schedule, alphas_cumprod, steps + 1)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return make_sigmas(choice.schedule, alphas_cumprod, steps)


def img2img_sigmas(sigmas: torch.Tensor, strength: float) -> torch.Tensor:
    """The tail of a full schedule that img2img runs at ``strength`` in (0, 1): ``t_enc = int(min(strength,
    0.999) * n)`` steps, i.e. ``sigmas[n - t_enc - 1:]`` (the web UI's convention); at least one step."""
    n = len(sigmas) - 1
    t_enc = int(min(strength, 0.999) * n)
    return sigmas[max(n - t_enc - 1, 0):]


def img2img_steps(choice: SamplerChoice, alphas_cumprod: torch.Tensor, steps: int, strength: float) -> int:
    """Sampler steps img2img makes at ``strength`` (0: none, the init latents are returned)."""
    if strength <= 0:
        return 0
    sigmas = sigmas_for(choice, alphas_cumprod, steps)
    return len(sigmas) - 1 if strength >= 1 else len(img2img_sigmas(sigmas, strength)) - 1


def run_schedule(choice: SamplerChoice, model: DenoiseFn, x: torch.Tensor, sigmas: torch.Tensor,
                 eta: Optional[float] = None, gens: Generators = None, callback: Callback = None) -> torch.Tensor:
    """x [B, C, h, w] at level ``sigmas[-1]`` from x at ``sigmas[0]`` by the chosen sampler over exactly these
    sigmas (descending), with the fresh noise a stochastic sampler needs (the SDXL refiner hand-off splits a
    schedule in two runs)."""
    spec = choice.spec
    kwargs = dict(spec.options)
    if spec.stochastic:
        kwargs["eta"] = spec.eta if eta is None else eta
        positive = sigmas[sigmas > 0]
        kwargs["noise"] = make_noise(x, gens, spec.brownian, (float(positive.min()), float(positive.max())))
    return spec.fn(model, x, sigmas, callback=callback, **kwargs)


def sample(choice: SamplerChoice, denoiser: SigmaDenoiser, x_T: torch.Tensor, steps: int, cond: Any = None,
           *, init: Optional[torch.Tensor] = None, strength: float = 1.0, eta: Optional[float] = None,
           gens: Generators = None, callback: Callback = None, model: Optional[DenoiseFn] = None) -> torch.Tensor:
    """Latents [B, C, h, w] from the standard-normal start noise x_T [B, C, h, w] in ``steps`` steps.

    With ``init`` (clean latents, img2img) and 0 < strength < 1 the run starts from init + noise at the level
    ``strength`` selects; strength >= 1 ignores init (txt2img from the same noise), strength 0 returns init.
    ``eta`` overrides a stochastic sampler's default; ``model`` overrides ``denoiser.bind(cond)`` (e.g. masked).
    """
    if init is not None and strength <= 0:
        return init
    sigmas = sigmas_for(choice, denoiser.alphas_cumprod, steps)
    spec = choice.spec
    if init is not None and strength < 1:
        sigmas = img2img_sigmas(sigmas, strength)
        x = init + x_T * float(sigmas[0])
    else:
        s0 = float(sigmas[0])
        x = x_T * (math.sqrt(1.0 + s0 * s0) if spec.vp_start else s0)
    x = run_schedule(choice, model if model is not None else denoiser.bind(cond), x, sigmas, eta, gens, callback)
    last = float(sigmas[-1])
    return x / math.sqrt(1.0 + last * last) if last > 0 else x

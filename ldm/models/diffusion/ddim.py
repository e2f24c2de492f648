"""DDIM sampler (Song et al. 2021) with the original ``DDIMSampler`` interface, incl. img2img encode/decode.

A thin class over :func:`ldm.samplers.sample_ddim`; see :mod:`ldm.samplers.legacy` for the shared API.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import torch

from ldm.models.diffusion.parameterization import extract
from ldm.samplers.legacy import OriginalSampler
from ldm.samplers.noise import gaussian_noise, randn_like
from ldm.samplers.original import sample_ddim

logger = logging.getLogger(__name__)

__all__ = ["DDIMSampler"]


class DDIMSampler(OriginalSampler):
    """``DDIMSampler(model, schedule="linear", device=None)``; ``sample(S, batch_size, shape, ...)``.

    The device follows the model when not given. ``eta`` > 0 adds fresh noise at every step (eta = 1: DDPM).
    Unlike the SD2 original (NotImplementedError), ``dynamic_threshold`` applies the RMS (norm) threshold to
    pred_x0, as the original PLMS does.
    """

    name = "DDIM"
    function = staticmethod(sample_ddim)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor | int, use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noise x0 [B, ...] to the level of grid index ``t`` [B] (img2img's ``t_enc``).

        ``t`` equal to the number of steps (strength 1.0, out of range in the original) noises to the last
        grid timestep, the most noisy one.
        """
        acp = self.denoiser.alphas_cumprod.to(x0.device)
        if use_original_steps:
            timesteps = torch.arange(acp.shape[0], device=x0.device)
        else:
            if self.ddim_timesteps is None:
                raise RuntimeError("call DDIMSampler.make_schedule(ddim_num_steps=...) first")
            timesteps = torch.as_tensor(self.ddim_timesteps, device=x0.device)
        index = torch.as_tensor(t, device=x0.device).long().reshape(-1).expand(x0.shape[0])
        if int(index.min()) < 0:
            raise ValueError(f"stochastic_encode needs non-negative step indices, got {int(index.min())}")
        index = index.clamp(max=len(timesteps) - 1)
        a = acp[timesteps]
        if noise is None:
            noise = randn_like(x0, generator)
        return extract(a.sqrt(), index, x0.shape) * x0 + extract((1.0 - a).sqrt(), index, x0.shape) * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Optional[Callable[[int], Any]] = None, generator: Optional[torch.Generator] = None,
               verbose: bool = False) -> torch.Tensor:
        """Denoise x_latent [B, ...] from grid index ``t_start - 1`` down to 0 (img2img); returns [B, ...].

        As the original, the first step is one grid step below the level ``stochastic_encode(.., t_start)``
        noised to; ``t_start`` = number of steps (strength 1.0) runs the whole schedule.
        """
        sigmas = self.grid(use_original_steps)
        t_start = min(int(t_start), len(sigmas) - 1)
        sigmas = sigmas[len(sigmas) - 1 - t_start:]
        model = self.model_fn(cond, unconditional_guidance_scale, unconditional_conditioning, sigmas)
        kwargs = {"noise": gaussian_noise(x_latent, generator), "eta": 0.0}
        return self.run(sigmas, x_latent, model, kwargs, callback)[0]

"""DDIM sampler (Song et al. 2021) with the original ``DDIMSampler`` interface, incl. img2img encode/decode."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from ldm.models.diffusion.parameterization import extract
from ldm.models.diffusion.sampler_adapter import GridSampler
from ldm.models.diffusion.sampling import DDIMStep, randn_like, sample_grid

logger = logging.getLogger(__name__)

__all__ = ["DDIMSampler"]


class DDIMSampler(GridSampler):
    """``DDIMSampler(model, schedule="linear", device=None)``; ``sample(S, batch_size, shape, ...)``.

    The device follows the model when not given. ``eta`` > 0 adds fresh noise at every step (eta = 1: DDPM).
    Unlike the SD2 original (NotImplementedError), ``dynamic_threshold`` applies the RMS (norm) threshold to
    pred_x0, as the original PLMS does.
    """

    step_class = DDIMStep
    name = "DDIM"

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor | int, use_original_steps: bool = False,
                          noise: torch.Tensor | None = None,
                          generator: torch.Generator | None = None) -> torch.Tensor:
        """Noise x0 [B, ...] to the level of grid index ``t`` [B] (img2img's ``t_enc``).

        ``t`` equal to the number of steps (strength 1.0, out of range in the original) noises to the last
        grid timestep, the most noisy one.
        """
        grid = self.grid_for(use_original_steps)
        index = torch.as_tensor(t, device=x0.device).long().reshape(-1).expand(x0.shape[0])
        if int(index.max()) >= len(grid):
            logger.debug("stochastic_encode: index %d clamped to the last step %d", int(index.max()), len(grid) - 1)
            index = index.clamp(max=len(grid) - 1)
        if int(index.min()) < 0:
            raise ValueError(f"stochastic_encode needs non-negative step indices, got {int(index.min())}")
        alphas = torch.as_tensor(grid.alphas, device=x0.device)
        sqrt_one_minus = torch.as_tensor(grid.sqrt_one_minus_alphas, device=x0.device)
        if noise is None:
            noise = randn_like(x0, generator)
        return extract(torch.sqrt(alphas), index, x0.shape) * x0 + extract(sqrt_one_minus, index, x0.shape) * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Callable[[int], Any] | None = None, generator: torch.Generator | None = None,
               verbose: bool = False) -> torch.Tensor:
        """Denoise x_latent [B, ...] from grid index ``t_start - 1`` down to 0 (img2img); returns [B, ...].

        As the original, the first step is one grid step below the level ``stochastic_encode(.., t_start)``
        noised to; ``t_start`` = number of steps (strength 1.0) runs the whole schedule.
        """
        grid = self.grid_for(use_original_steps)
        t_start = min(int(t_start), len(grid))
        step = self.make_step(grid, unconditional_guidance_scale, unconditional_conditioning, generator=generator)
        x, _ = sample_grid(step, x_latent, cond, grid, t_start=t_start, callback=callback, generator=generator,
                           progress=verbose, desc="Decoding image")
        return x

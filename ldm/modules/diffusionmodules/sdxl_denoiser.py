"""SDXL's discrete denoiser (``sgm``'s ``DiscreteDenoiser``), its scalings and the legacy DDPM discretization.

The denoiser turns a network trained on the 1000 discrete DDPM timesteps into ``D(x, sigma)``: sigma is QUANTIZED to
the nearest of the model's 1000 sigmas, the network sees ``c_in * x`` and that sigma's INDEX as its timestep, and
``D = network(...) * c_out + x * c_skip``. The scalings give ``(c_skip, c_out, c_in, c_noise)`` for a sigma.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ldm.modules.diffusionmodules.schedules import make_beta_schedule
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EpsScaling:
    """eps-prediction: c_skip 1, c_out -sigma, c_in 1/sqrt(sigma^2+1), c_noise sigma."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        """(c_skip, c_out, c_in, c_noise), each shaped like ``sigma``."""
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1.0) ** 0.5, sigma.clone()


class VScaling:
    """v-prediction: c_skip 1/(sigma^2+1), c_out -sigma/sqrt(sigma^2+1), c_in 1/sqrt(sigma^2+1), c_noise sigma."""

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        """(c_skip, c_out, c_in, c_noise), each shaped like ``sigma``."""
        return (1.0 / (sigma ** 2 + 1.0), -sigma / (sigma ** 2 + 1.0) ** 0.5, 1.0 / (sigma ** 2 + 1.0) ** 0.5,
                sigma.clone())


class Discretization:
    """A sigma grid: ``get_sigmas(n)`` (descending), optionally with 0 appended and flipped (ascending)."""

    def __call__(self, n: int, do_append_zero: bool = True, device: torch.device | str = "cpu",
                 flip: bool = False) -> torch.Tensor:
        """[n (+1)] float32 sigmas, descending (ascending when ``flip``)."""
        sigmas = self.get_sigmas(n, device=device)
        if do_append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return torch.flip(sigmas, (0,)) if flip else sigmas

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[n] descending sigmas."""
        raise NotImplementedError


class LegacyDDPMDiscretization(Discretization):
    """Sigmas of the SD linear-in-sqrt(beta) schedule at ``n`` roughly equally spaced timesteps (all 1000 for n=1000).

    The timesteps are ``linspace(T-1, 0, n, endpoint=False).astype(int)`` reversed (not k-diffusion's grid); the
    ratio (1-acp)/acp is formed in float64 and its square root taken in float32, as the original does.
    """

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000) -> None:
        self.num_timesteps = num_timesteps
        betas = make_beta_schedule("linear", num_timesteps, linear_start=linear_start, linear_end=linear_end)
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)

    def timesteps(self, n: int) -> np.ndarray:
        """The [n] ascending integer timesteps whose sigmas ``get_sigmas(n)`` returns (in descending order)."""
        if not 1 <= n <= self.num_timesteps:
            raise ValueError(f"the legacy DDPM discretization has 1..{self.num_timesteps} steps, got {n}")
        if n == self.num_timesteps:
            return np.arange(n)
        return np.linspace(self.num_timesteps - 1, 0, n, endpoint=False).astype(int)[::-1]

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """[n] float32 sigmas sqrt((1-acp)/acp), descending."""
        acp = self.alphas_cumprod[self.timesteps(n)]
        sigmas = torch.tensor((1 - acp) / acp, dtype=torch.float32, device=device) ** 0.5
        return torch.flip(sigmas, (0,))


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] with ``target_dims`` dimensions in all."""
    return x[(...,) + (None,) * (target_dims - x.dim())]


class DiscreteDenoiser(nn.Module):
    """``D(network, x, sigma, cond)`` for a network trained on ``num_idx`` discrete timesteps (``sgm``'s layout:
    one buffer ``sigmas`` [num_idx], ascending, float32).

    ``sigmas`` stays float32 when the module is cast (``.half()``): in float16 neighbouring sigmas would collide.
    A file without ``sigmas`` gets the schedule's; a float16/bfloat16 copy of them is replaced by the float32 values.
    """

    def __init__(self, scaling_config: Mapping[str, Any], num_idx: int, discretization_config: Mapping[str, Any],
                 do_append_zero: bool = False, quantize_c_noise: bool = True, flip: bool = True) -> None:
        super().__init__()
        self.scaling: Callable[[torch.Tensor], Scalings] = instantiate_from_config(scaling_config)
        self.discretization: Discretization = instantiate_from_config(discretization_config)
        self.num_idx = num_idx
        self.quantize_c_noise = quantize_c_noise
        exact = self.discretization(num_idx, do_append_zero=do_append_zero, device="cpu", flip=flip)
        self._exact_sigmas = exact
        self.register_buffer("sigmas", exact.clone())
        self.register_load_state_dict_pre_hook(self._check_loaded_sigmas)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The discrete schedule [T] (float64) behind the sigmas, for schedules built from alpha_bar."""
        return torch.as_tensor(self.discretization.alphas_cumprod, dtype=torch.float64)

    def _check_loaded_sigmas(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load pre-hook: supply ``sigmas`` when absent; float32 values when the file's are a rounded copy."""
        key = prefix + "sigmas"
        given = state_dict.get(key)
        exact = self._exact_sigmas
        if given is None:
            state_dict[key] = exact.clone()
            return
        if given.is_meta or given.shape != exact.shape or not given.is_floating_point() or given.element_size() >= 4:
            return  # a float32 table is used as saved (as the original does)
        if torch.allclose(given.detach().to("cpu", torch.float32), exact, rtol=1e-3, atol=0.0):
            state_dict[key] = exact.clone()
        else:
            logger.info("checkpoint key '%s' holds a different sigma schedule than the config's; using the file's",
                        key)

    def _apply(self, fn: Callable, recurse: bool = True) -> "DiscreteDenoiser":
        """As ``nn.Module._apply``, but ``sigmas`` only follows device moves, never dtype casts."""
        sigmas = self.sigmas
        super()._apply(fn, recurse)
        if self.sigmas.dtype != sigmas.dtype and sigmas.is_floating_point():
            self.sigmas = sigmas.to(self.sigmas.device)
        return self

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index [B] (int64) of the nearest of ``sigmas`` for each sigma [B]."""
        sigma = torch.as_tensor(sigma).to(self.sigmas)
        return (sigma - self.sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape)

    def idx_to_sigma(self, idx: torch.Tensor | int) -> torch.Tensor:
        """``sigmas[idx]``."""
        return self.sigmas[idx]

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        """The nearest of ``sigmas`` for each sigma [B] (float32)."""
        return self.idx_to_sigma(self.sigma_to_idx(sigma))

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        """The network's timestep: the index of ``c_noise`` among the sigmas (or ``c_noise`` itself)."""
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise

    def forward(self, network: Callable[..., torch.Tensor], input: torch.Tensor,  # noqa: A002 (original name)
                sigma: torch.Tensor, cond: Mapping[str, torch.Tensor], **additional_model_inputs: Any) -> torch.Tensor:
        """Denoised estimate [B, ...] of ``input`` [B, ...] at levels ``sigma`` [B]; ``network(x, t, cond)``."""
        sigma = self.possibly_quantize_sigma(sigma)
        sigma_shape = sigma.shape
        sigma = append_dims(sigma, input.dim())
        c_skip, c_out, c_in, c_noise = self.scaling(sigma)
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma_shape))
        return network(input * c_in, c_noise, cond, **additional_model_inputs) * c_out + input * c_skip

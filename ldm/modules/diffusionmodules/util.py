"""Small network helpers of the diffusion UNet, under their original names and import path.

The schedule functions live in :mod:`ldm.modules.diffusionmodules.schedules`; they are re-exported here
because the original code (and ``check.py``) imports them from ``ldm.modules.diffusionmodules.util``.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from ldm.modules.diffusionmodules.schedules import (  # noqa: F401  (re-exported)
    make_beta_schedule,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
)
from ldm.util import mean_flat  # noqa: F401  (re-exported under its original path)

__all__ = [
    "GroupNorm32", "avg_pool_nd", "checkpoint", "conv_nd", "extract_into_tensor", "linear",
    "make_beta_schedule", "make_ddim_sampling_parameters", "make_ddim_timesteps", "mean_flat",
    "noise_like", "normalization", "scale_module", "timestep_embedding", "zero_module",
]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000,
                       repeat_only: bool = False) -> torch.Tensor:
    """Sinusoidal embedding [B] -> [B, dim] (float32), ``cat([cos, sin])`` as in the original UNet.

    Integer and float timesteps are both accepted; they are cast to float32 like the original.
    """
    if repeat_only:
        return repeat(timesteps, "b -> b d", d=dim)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module: nn.Module, scale: float) -> nn.Module:
    """Multiply every parameter of ``module`` by ``scale`` in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (fp16 stability)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    """The UNet's standard normalisation layer: 32-group GroupNorm computed in float32."""
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D convolution (``nn.ConvNd(*args, **kwargs)``)."""
    convs = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convs:
        raise ValueError(f"unsupported dimensions: {dims} (use 1, 2 or 3)")
    return convs[dims](*args, **kwargs)


def linear(*args: Any, **kwargs: Any) -> nn.Linear:
    """``nn.Linear(*args, **kwargs)``."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    """A 1D, 2D or 3D average pooling layer."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"unsupported dimensions: {dims} (use 1, 2 or 3)")
    return pools[dims](*args, **kwargs)


def checkpoint(func: Callable[..., Any], inputs: Sequence[Any], params: Iterable[torch.Tensor],
               flag: bool) -> Any:
    """``func(*inputs)``, recomputed in the backward pass (gradient checkpointing) when ``flag`` is set.

    Uses non-reentrant ``torch.utils.checkpoint``, which finds the parameters itself; ``params`` is kept
    for the original signature. Nothing is checkpointed when gradients are disabled.
    """
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: Sequence[int]) -> torch.Tensor:
    """Gather ``a[t]`` ([T] indexed by [B]) and reshape to [B, 1, ..., 1] to broadcast against ``x_shape``."""
    b = t.shape[0]
    out = a.gather(-1, t)
    return out.reshape(b, *((1,) * (len(x_shape) - 1)))


def noise_like(shape: Sequence[int], device: torch.device | str, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise of ``shape`` drawn with ``torch.randn``; with ``repeat`` one draw shared by the batch."""
    shape = tuple(shape)
    if repeat:
        noise = torch.randn((1, *shape[1:]), device=device)
        return noise.repeat(shape[0], *((1,) * (len(shape) - 1)))
    return torch.randn(shape, device=device)

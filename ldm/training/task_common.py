"""Helpers shared by the training tasks (diffusion, autoencoder)."""
from __future__ import annotations

import contextlib
import inspect
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ldm.training.distributed import DistContext


def images_nchw(batch: Mapping[str, Any], key: str, device: torch.device) -> torch.Tensor:
    """``batch[key]`` [B, H, W, C] in [-1, 1] -> contiguous float [B, C, H, W] on ``device``."""
    if key not in batch:
        raise KeyError(f"the batch has no '{key}' entry (keys: {sorted(batch)}); check the dataset's image_key "
                       f"against the model's first_stage_key / image_key")
    x = batch[key]
    if x.dim() == 3:
        x = x[..., None]
    return x.permute(0, 3, 1, 2).contiguous().float().to(device, non_blocking=True)


def batch_to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Tensors of ``batch`` moved to ``device`` (strings and lists untouched)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def wrap_ddp(module: nn.Module, ctx: DistContext, broadcast_buffers: bool = False) -> nn.Module:
    """``module`` in DistributedDataParallel when several processes train (else as is)."""
    if not ctx.distributed:
        return module
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # buffers are always synced from rank 0 at construction; this flag is about every forward pass
    # (newer torch renamed it, keeping the old name with a deprecation warning)
    name = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True,
                                   **{name: broadcast_buffers})


def grad_sync(module: nn.Module, last_micro_batch: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation."""
    if isinstance(module, DistributedDataParallel) and not last_micro_batch:
        return module.no_sync()
    return contextlib.nullcontext()


def set_requires_grad(params: Iterable[nn.Parameter], flag: bool) -> None:
    """Switch gradients of ``params`` on or off."""
    for p in params:
        p.requires_grad_(flag)


def fork_rng(device: torch.device, seed: int | None = None) -> contextlib.AbstractContextManager:
    """RNG context whose draws leave the training RNG untouched (optionally seeded for repeatable results)."""
    devices = [device.index or 0] if device.type == "cuda" else []

    @contextlib.contextmanager
    def ctx():
        with torch.random.fork_rng(devices=devices):
            if seed is not None:
                torch.manual_seed(seed)
            yield
    return ctx()

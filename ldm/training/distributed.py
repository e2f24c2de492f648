"""torch.distributed plumbing: process-group set-up (NCCL on GPUs, gloo on CPU) and small collective helpers."""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Where this process stands: its rank, the number of processes and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        """True when more than one process trains together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints, logs and images."""
        return self.rank == 0


def env_rank_info(env: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun exports them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    env = os.environ if env is None else env
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def pick_device(local_rank: int, requested: str | None = None) -> torch.device:
    """The device of this process: ``requested`` ("cpu", "cuda", "cuda:1"), else this rank's GPU when there is one."""
    if requested and requested != "auto":
        dev = torch.device(requested)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", local_rank)
        return dev
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(rank: int, world_size: int, local_rank: int, device: str | None = None,
                     init_method: str | None = None, timeout_s: float = 1800.0) -> DistContext:
    """Set up this process (and the process group when ``world_size > 1``); returns its :class:`DistContext`.

    ``init_method`` defaults to ``env://`` (what torchrun provides); tests pass a ``file://`` rendezvous.
    """
    dev = pick_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=init_method or "env://", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
        logger.info("process group ready: rank %d of %d, backend %s, device %s", rank, world_size, backend, dev)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown() -> None:
    """Destroy the process group if one was set up."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op in a single process)."""
    if ctx.distributed:
        dist.barrier()


def all_reduce_mean(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of ``values`` over ranks (same shape on every rank); the input is not modified."""
    if not ctx.distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / ctx.world_size


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum of ``values`` over ranks; the input is not modified."""
    if not ctx.distributed:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj`` (picklable, used for small per-rank states) as a list indexed by rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]

"""Optimizers, LR schedules, mixed precision and the per-optimizer step (unscale, clip, step, schedule)."""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)
_DTYPES = {"32": None, "16": torch.float16, "bf16": torch.bfloat16}


class Precision:
    """Autocast for the forward pass and a GradScaler (active for fp16 only) for ``mode`` "32", "16" or "bf16"."""

    def __init__(self, mode: str, device: torch.device) -> None:
        self.mode, self.device = mode, device
        self.dtype = _DTYPES[mode]
        if mode == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("trainer.precision bf16 is not supported by this GPU; use 16 or 32")

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: autocast to fp16/bf16, or nothing in full precision."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A loss scaler, enabled only for fp16."""
        return torch.amp.GradScaler(self.device.type, enabled=self.mode == "16")


def lambda_lr_state(scheduler: LambdaLR) -> dict[str, Any]:
    """``LambdaLR`` state without the lambda objects (plain data only)."""
    state = scheduler.state_dict()
    state.pop("lr_lambdas", None)
    return state


def load_lambda_lr_state(scheduler: LambdaLR, state: Mapping[str, Any]) -> None:
    """Inverse of :func:`lambda_lr_state` (the lambdas themselves are rebuilt from the config)."""
    state = dict(state)
    state["lr_lambdas"] = [None] * len(scheduler.lr_lambdas)
    scheduler.load_state_dict(state)


class OptimizerSlot:
    """One optimizer with its parameters, LR schedule, loss scaler and gradient clipping."""

    def __init__(self, name: str, optimizer: torch.optim.Optimizer, params: list[nn.Parameter],
                 scaler: torch.amp.GradScaler, scheduler: LambdaLR | None = None, clip: float = 0.0) -> None:
        self.name, self.optimizer, self.params = name, optimizer, params
        self.scaler, self.scheduler, self.clip = scaler, scheduler, clip

    @property
    def lr(self) -> float:
        """Current learning rate of the first parameter group."""
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: torch.Tensor) -> None:
        """Backward pass of ``loss`` (scaled for fp16)."""
        self.scaler.scale(loss).backward()

    def step(self) -> dict[str, float]:
        """Unscale, clip, step (skipped by the scaler on inf/nan), advance the schedule, zero the gradients."""
        logs: dict[str, float] = {}
        if self.clip > 0:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
            logs[f"{self.name}/grad_norm"] = norm
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None:
            self.scheduler.step()
        return logs

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and scaler states (plain data)."""
        return {"optimizer": self.optimizer.state_dict(),
                "lr_scheduler": lambda_lr_state(self.scheduler) if self.scheduler is not None else None,
                "grad_scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("lr_scheduler") is not None:
            load_lambda_lr_state(self.scheduler, state["lr_scheduler"])
        if state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])


def build_scheduler(optimizer: torch.optim.Optimizer, scheduler_config: Mapping[str, Any] | None) -> LambdaLR | None:
    """``LambdaLR`` over the multiplier of ``scheduler_config`` (e.g. ``ldm.lr_scheduler.LambdaLinearScheduler``)."""
    if not scheduler_config:
        return None
    schedule = instantiate_from_config(scheduler_config)
    logger.info("LR schedule %s (multiplier of the base learning rate, per step)", scheduler_config["target"])
    return LambdaLR(optimizer, lr_lambda=schedule)


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The parameters that require gradients."""
    return [p for p in params if p.requires_grad]

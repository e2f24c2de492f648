"""Exponential moving average of a module's trainable parameters, stored as buffers (``LitEma``).

Checkpoint layout as the original: buffers ``decay`` (float32), ``num_updates`` (int32; -1 when the warm-up
is off) and one shadow buffer per trainable parameter, named after the parameter with its dots removed.
"""
from __future__ import annotations

import logging
from typing import Iterable

import torch
from torch import nn

logger = logging.getLogger(__name__)


class LitEma(nn.Module):
    """EMA of ``model``'s trainable parameters: ``shadow -= (1 - decay) * (shadow - param)`` per update.

    With ``use_num_upates`` (the original spelling; ``use_num_updates`` is accepted too) the decay warms up as
    ``min(decay, (1 + n) / (10 + n))`` where ``n`` counts the updates (incremented before use).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_upates: bool = True,
                 use_num_updates: bool | None = None) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1], got {decay}")
        counting = use_num_upates if use_num_updates is None else use_num_updates
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if counting else -1, dtype=torch.int))
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            s_name = name.replace(".", "")
            if s_name in self.m_name2s_name.values() or s_name in ("decay", "num_updates"):
                raise ValueError(f"parameter '{name}' maps to the EMA buffer name '{s_name}', which is taken; "
                                 f"rename the parameter")
            self.m_name2s_name[name] = s_name
            self.register_buffer(s_name, p.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    def reset_num_updates(self) -> None:
        """Restart the decay warm-up: ``num_updates`` becomes 0 (and counting is switched on)."""
        self.num_updates = torch.tensor(0, dtype=torch.int, device=self.num_updates.device)

    def current_decay(self) -> torch.Tensor:
        """Advance the update counter (when counting) and return this update's decay (float32 scalar)."""
        if self.num_updates < 0:
            return self.decay
        self.num_updates += 1
        warmup = (1 + self.num_updates) / (10 + self.num_updates)
        return torch.minimum(self.decay, warmup.to(self.decay.dtype))

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update of the shadow buffers towards ``model``'s current trainable parameters."""
        one_minus_decay = 1.0 - self.current_decay()
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            s_name = self._shadow_name(name)
            shadow = shadows[s_name]
            if shadow.dtype != param.dtype:  # follow the model's dtype, as the original's type_as
                shadow = shadow.to(param.dtype)
                setattr(self, s_name, shadow)
            shadow.sub_(one_minus_decay.to(param.dtype) * (shadow - param))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite ``model``'s trainable parameters with the EMA values (frozen ones are left alone)."""
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.data.copy_(shadows[self._shadow_name(name)].data)

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of ``parameters`` to put back later with :meth:`restore`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        """Copy the values saved by :meth:`store` back into ``parameters`` (same order)."""
        if not self.collected_params:
            raise RuntimeError("LitEma.restore() called without a preceding store()")
        for saved, param in zip(self.collected_params, parameters):
            param.data.copy_(saved.data)
        self.collected_params = []

    def _shadow_name(self, name: str) -> str:
        try:
            return self.m_name2s_name[name]
        except KeyError:
            raise KeyError(f"parameter '{name}' is trainable but has no EMA copy: the model differs from the one "
                           f"this LitEma was built for") from None

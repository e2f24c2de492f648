"""The network wrapper of a diffusion model (``model.diffusion_model.*`` in checkpoints) and module freezing."""
from __future__ import annotations

import types
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.util import instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")


def disabled_train(self: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement ``train()`` of frozen sub-models: they stay in eval mode whatever the parent does."""
    return self


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode for good (its ``train()`` disabled) and stop its gradients; returns it."""
    module.eval()
    module.train = types.MethodType(disabled_train, module)
    for param in module.parameters():
        param.requires_grad = False
    return module


def _cat(tensors: Sequence[torch.Tensor] | None, dim: int, what: str, key: str) -> torch.Tensor:
    if not tensors:
        raise ValueError(f"conditioning_key '{key}' needs {what} conditioning, but none was given")
    return torch.cat(list(tensors), dim)


class DiffusionWrapper(nn.Module):
    """Routes conditioning to the network ``diffusion_model`` according to ``conditioning_key``.

    concat: channel-concatenated to x; crossattn: ``context`` of the attention layers (sequence-concatenated);
    hybrid: both; adm: class/vector ``y``; hybrid-adm / crossattn-adm: combinations.
    """

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None) -> None:
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"unknown conditioning_key '{conditioning_key}'; choose one of {CONDITIONING_KEYS}")
        config = dict(diff_model_config)
        self.sequential_cross_attn = bool(config.pop("sequential_crossattn", False))
        self.diffusion_model = instantiate_from_config(config)
        self.conditioning_key = conditioning_key

    def _context(self, c_crossattn: Sequence[torch.Tensor] | None) -> Any:
        if self.sequential_cross_attn:
            return c_crossattn
        return _cat(c_crossattn, 1, "cross-attention", self.conditioning_key)

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Sequence[torch.Tensor] | None = None,
                c_crossattn: Sequence[torch.Tensor] | None = None, c_adm: torch.Tensor | None = None) -> torch.Tensor:
        """Network output [B, C_out, ...] for x [B, C, ...], timesteps t [B] and lists of conditionings."""
        key = self.conditioning_key
        if key is None:
            return self.diffusion_model(x, t)
        if key == "concat":
            return self.diffusion_model(torch.cat([x, *_cat_list(c_concat, key)], dim=1), t)
        if key == "crossattn":
            return self.diffusion_model(x, t, context=self._context(c_crossattn))
        if key == "hybrid":
            xc = torch.cat([x, *_cat_list(c_concat, key)], dim=1)
            return self.diffusion_model(xc, t, context=_cat(c_crossattn, 1, "cross-attention", key))
        if key == "adm":
            return self.diffusion_model(x, t, y=_cat_list(c_crossattn, key)[0])
        if c_adm is None:
            raise ValueError(f"conditioning_key '{key}' needs c_adm")
        cc = _cat(c_crossattn, 1, "cross-attention", key)
        if key == "hybrid-adm":
            return self.diffusion_model(torch.cat([x, *_cat_list(c_concat, key)], dim=1), t, context=cc, y=c_adm)
        return self.diffusion_model(x, t, context=cc, y=c_adm)


def _cat_list(items: Sequence[torch.Tensor] | None, key: str) -> list[torch.Tensor]:
    if not items:
        raise ValueError(f"conditioning_key '{key}' needs a conditioning, but none was given")
    return list(items)

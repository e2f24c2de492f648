"""Training helpers of the diffusion models: conditioning dropout, optimizer set-up, checkpoint loading/resizing."""
from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


def conditioning_dropout(batch: Mapping[str, Any], ucg_training: Mapping[str, Mapping[str, Any]],
                         prng: np.random.RandomState) -> dict[str, Any]:
    """Copy of ``batch`` where each item of ``batch[k]`` becomes ``ucg_training[k]["val"]`` with probability p.

    The config format is SD2's ``{txt: {p: 0.1, val: ""}}`` (``val: null`` means ""). The batch itself
    is not modified.
    """
    out = dict(batch)
    for k, spec in ucg_training.items():
        if k not in out:
            raise KeyError(f"ucg_training names the batch key '{k}', which the batch does not have")
        p, val = float(spec["p"]), spec.get("val")
        val = "" if val is None else val
        items = out[k].clone() if torch.is_tensor(out[k]) else list(out[k])
        for i in range(len(items)):
            if prng.choice(2, p=[1 - p, p]):
                items[i] = val
        out[k] = items
    return out


def make_optimizer(params: Iterable[torch.nn.Parameter], lr: float,
                   scheduler_config: Mapping[str, Any] | None = None) -> Any:
    """AdamW over ``params`` at ``lr``; with a scheduler config, ``([opt], [LambdaLR per step])`` as the original."""
    opt = torch.optim.AdamW(list(params), lr=lr)
    if scheduler_config is None:
        return opt
    schedule = instantiate_from_config(scheduler_config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=schedule.schedule)
    return [opt], [{"scheduler": scheduler, "interval": "step", "frequency": 1}]


def fit_tensor(old: torch.Tensor, new_shape: Sequence[int]) -> torch.Tensor:
    """The original ``make_it_fit`` resizing of a checkpoint tensor to ``new_shape`` (first two axes cycled).

    Entries are repeated cyclically along the first two axes; for 2+-d tensors every input column j is then
    divided by 1 + (the number of times it is used), exactly like the original.
    """
    if len(old.shape) != len(new_shape) or tuple(old.shape[2:]) != tuple(new_shape[2:]):
        raise ValueError(f"make_it_fit cannot turn shape {list(old.shape)} into {list(new_shape)}")
    idx0 = torch.arange(new_shape[0]) % old.shape[0]
    if len(new_shape) == 1:
        return old[idx0].clone()
    idx1 = torch.arange(new_shape[1]) % old.shape[1]
    used = 1 + torch.bincount(idx1, minlength=old.shape[1]).to(old.dtype)
    return old[idx0][:, idx1] / used[idx1].reshape(1, -1, *((1,) * (len(new_shape) - 2)))


def fit_state_dict(sd: dict[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``sd`` with every tensor whose shape differs from the model's (``own``) resized by :func:`fit_tensor`."""
    return {k: fit_tensor(v, own[k].shape) if k in own and v.shape != own[k].shape else v for k, v in sd.items()}


@torch.no_grad()
def load_checkpoint_into(target: torch.nn.Module, path: str, ignore_keys: Sequence[str] = (),
                         make_it_fit: bool = False) -> None:
    """Load a .ckpt/.safetensors file into ``target`` (the original's ``init_from_ckpt``), read safely.

    Keys starting with any of ``ignore_keys`` are dropped first and may be missing; other mismatches (beyond the
    original's EMA and training-loss leniency, see :func:`ldm.checkpoint.load_config_checkpoint`) are one
    :class:`ldm.checkpoint.CheckpointError` naming the file. ``make_it_fit`` resizes other-shaped tensors.
    """
    from ldm.checkpoint import (TRAINING_ONLY_PREFIXES, drop_ignored_keys, load_config_checkpoint,
                                load_state_dict_file)

    sd = load_state_dict_file(path)
    drop_ignored_keys(sd, ignore_keys)
    if make_it_fit:
        sd = fit_state_dict(sd, target.state_dict())
    load_config_checkpoint(target, sd, path, ignore_keys, allow_unexpected=TRAINING_ONLY_PREFIXES,
                           allow_missing=TRAINING_ONLY_PREFIXES)

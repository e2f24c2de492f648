"""Small helpers shared across the package: config instantiation and defaults."""
from __future__ import annotations

import importlib
from inspect import isfunction
from typing import Any, Mapping

import torch

from ldm.sgm_aliases import resolve_target


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import and return the object named by a dotted path such as ``ldm.models.autoencoder.AutoencoderKL``.

    The ``sgm.*`` paths of the SDXL configs resolve to the project's classes (``ldm.sgm_aliases``)."""
    module, cls = resolve_target(string).rsplit(".", 1)
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"cannot import module '{module}' named in config target '{string}': {e}") from e
    if reload:
        mod = importlib.reload(mod)
    try:
        return getattr(mod, cls)
    except AttributeError as e:
        raise ImportError(f"module '{module}' has no attribute '{cls}' (config target '{string}')") from e


def instantiate_from_config(config: Mapping[str, Any], **extra: Any) -> Any:
    """Build ``config['target'](**config['params'], **extra)``; the original ``target:``/``params:`` convention.

    It imports and calls whatever ``target`` names: a config that is not the user's own (one that came with a
    download) must pass ``ldm.config_policy.check_config`` first, as ``ldm.inference.loading.read_config`` does.
    """
    if "target" not in config:
        if config == "__is_first_stage__" or config == "__is_unconditional__":
            return None
        raise KeyError("Expected key `target` to instantiate.")
    params = config.get("params", None) or {}
    return get_obj_from_str(config["target"])(**dict(params), **extra)


def exists(x: Any) -> bool:
    """True when ``x`` is not None."""
    return x is not None


def default(val: Any, d: Any) -> Any:
    """``val`` if it is not None, else ``d`` (called first when it is a function)."""
    if exists(val):
        return val
    return d() if isfunction(d) else d


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: [B, ...] -> [B]."""
    return tensor.mean(dim=list(range(1, len(tensor.shape))))


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())

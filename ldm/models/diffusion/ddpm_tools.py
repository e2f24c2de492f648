"""What the pixel-DDPM commands share: loading a model from config + checkpoint, class conditioning, images.

Used by ``scripts/sample_ddpm.py`` and ``scripts/bits_per_dim.py``.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)


def load_ddpm(config_path: str | Path, ckpt: str | Path, use_ema: bool = True,
              device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """(model in eval mode, full config) from a training config and a checkpoint (.ckpt or .safetensors).

    The model is built without its own EMA copy; the checkpoint's EMA weights (``model_ema.*``) replace the raw
    ones when ``use_ema`` and present (an EMA-only export is loaded as it is).
    """
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config

    cfg = OmegaConf.load(config_path)
    if "model" not in cfg:
        raise ValueError(f"{config_path} has no 'model:' section")
    model_cfg = copy.deepcopy(OmegaConf.to_container(cfg.model, resolve=True))
    model_cfg.pop("base_learning_rate", None)
    params = model_cfg.setdefault("params", {})
    params.pop("base_learning_rate", None)
    params["use_ema"] = False
    params.pop("ckpt_path", None)
    model = load_model_from_config(model_cfg, ckpt, use_ema=use_ema, device=device)
    return model, cfg


def class_embedder(model: Any) -> Any | None:
    """The model's class-label cond stage (one with ``get_unconditional_conditioning``), or None."""
    stage = getattr(model, "cond_stage_model", None)
    return stage if callable(getattr(stage, "get_unconditional_conditioning", None)) else None


def default_labels(model: Any, n: int) -> list[int]:
    """``n`` labels cycling over the model's real classes (the null class of guidance left out)."""
    stage = class_embedder(model)
    if stage is None:
        raise ValueError("the model has no class-label conditioning")
    real = stage.n_classes - 1 if stage.ucg_rate > 0 else stage.n_classes
    return [i % max(real, 1) for i in range(n)]


def class_conditioning(model: Any, labels: Sequence[int], guidance_scale: float = 1.0) -> tuple[Any, Any]:
    """(cond, uncond) for class ``labels``; uncond (the null class) only when guidance_scale != 1, else None.

    Models without a class embedder get (None, None) and must not be given labels.
    """
    stage = class_embedder(model)
    if stage is None:
        if getattr(model, "cond_stage_model", None) is not None:
            raise ValueError("this model's conditioning is not a class label; the DDPM commands only handle "
                             "class-conditional or unconditional models")
        return None, None
    device = model.device
    with torch.no_grad():
        cond = model.get_learned_conditioning({stage.key: torch.as_tensor(list(labels), device=device)})
        uncond = None
        if guidance_scale != 1.0:
            uncond = model.get_learned_conditioning(stage.get_unconditional_conditioning(len(labels), device))
    return cond, uncond


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (rounded, clipped; 1 channel kept as is)."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def intermediates_strip(intermediates: dict[str, list[torch.Tensor]], max_samples: int = 4) -> torch.Tensor:
    """[3, H', W'] image in [-1, 1]: per sample a row of x_t frames over time, then a row of predicted x0.

    The first entry of each list (x_T, logged twice) opens both rows.
    """
    from torchvision.utils import make_grid

    x_inter, pred = intermediates["x_inter"], intermediates["pred_x0"]
    if len(x_inter) != len(pred) or not x_inter:
        raise ValueError("intermediates need equally long, non-empty 'x_inter' and 'pred_x0' lists")
    n = min(max_samples, x_inter[0].shape[0])
    rows = []
    for i in range(n):
        rows.append(torch.stack([frame[i] for frame in x_inter]))
        rows.append(torch.stack([frame[i] for frame in pred]))
    frames = torch.cat(rows).float().cpu().clamp(-1, 1)
    if frames.shape[1] == 1:
        frames = frames.repeat(1, 3, 1, 1)
    return make_grid(frames, nrow=len(x_inter), padding=1, pad_value=1.0)

"""From trained parts to the shipped model: initial LatentDiffusion weights, the inference config, the export."""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

FIRST_STAGE_PREFIX = "first_stage_model."
COND_STAGE_PREFIX = "cond_stage_model.model."  # the SD2 layout of an OpenCLIP text tower
NETWORK_PREFIXES = ("model.diffusion_model.", FIRST_STAGE_PREFIX, "cond_stage_model.")
PLAIN_AUTOENCODER = "ldm.models.autoencoder.AutoencoderKL"
_TRAINING_ONLY = ("ckpt_path", "ignore_keys", "ucg_training", "scheduler_config", "monitor")


def initial_state(autoencoder: Mapping[str, torch.Tensor], clip: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LatentDiffusion keys for the trained autoencoder and the CLIP text tower (no UNet: it starts random)."""
    state = {FIRST_STAGE_PREFIX + k: v for k, v in autoencoder.items() if not k.startswith("loss.")}
    state.update({COND_STAGE_PREFIX + k: v for k, v in clip.items() if not k.startswith("visual.")})
    return state


def inference_config(train_config: DictConfig, scale_factor: float) -> DictConfig:
    """The inference config of a training config: plain AutoencoderKL, fixed ``scale_factor``, EMA folded in."""
    cfg = OmegaConf.create({"model": OmegaConf.to_container(train_config.model, resolve=False)})
    cfg.model.pop("base_learning_rate", None)
    params = cfg.model.params
    for key in _TRAINING_ONLY:
        params.pop(key, None)
    params.scale_factor = float(scale_factor)
    params.use_ema = False
    params.first_stage_config.target = PLAIN_AUTOENCODER
    params.first_stage_config.params.pop("monitor", None)
    params.first_stage_config.params.pop("ckpt_path", None)
    return cfg


def shipped_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """Network weights in ``dtype`` (schedule buffers and other top-level tensors keep float32)."""
    out = {}
    for key, value in state.items():
        if key.startswith(NETWORK_PREFIXES) and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.detach().cpu().contiguous()
    return out


def build(config: DictConfig | Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate the ``model`` section of a config (random weights)."""
    section = config["model"]
    return instantiate_from_config(OmegaConf.to_container(section, resolve=True)
                                   if isinstance(section, DictConfig) else copy.deepcopy(dict(section)))


def export_model(ema_weights: str | Path, config: DictConfig, out_dir: str | Path,
                 dtype: torch.dtype = torch.float16) -> tuple[Path, Path]:
    """Check that the EMA weights load strictly into ``config``'s model, then write ``config.yaml`` and
    ``model.safetensors`` (weights in ``dtype``) to ``out_dir``."""
    from ldm.checkpoint import load_state_dict_file, load_weights

    state = load_state_dict_file(ema_weights)
    model = build(config)
    load_weights(model, state, use_ema=False, source=f"EMA weights file '{ema_weights}'")  # strict, readable errors
    own = model.state_dict()
    state = {k: state[k] for k in own if k in state}  # the model's key order (ignorable missing keys left out)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights, config_path = out_dir / "model.safetensors", out_dir / "config.yaml"
    save_file(shipped_state(state, dtype), str(weights), metadata={"format": "pt", "source": "sd-shapes (EMA)"})
    OmegaConf.save(config, config_path)
    logger.info("exported %d tensors to %s (%.1f MB) and %s", len(state), weights, weights.stat().st_size / 2 ** 20,
                config_path)
    return config_path, weights

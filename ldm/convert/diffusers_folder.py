"""Read a diffusers model folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``scheduler/``) into
one state dict in our checkpoint layout, and write ours as such a folder.

Weights are read with ``ldm.checkpoint`` (safetensors preferred; ``.bin`` files only through its safe unpickler).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ldm.checkpoint import CheckpointError, read_checkpoint
from ldm.inference.errors import UsageError
from ldm.convert import diffusers_keys as dk
from ldm.convert import diffusers_text as dt

logger = logging.getLogger(__name__)

INDEX = "model_index.json"
_WEIGHT_STEMS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_BIN_NAMES = {"unet": "diffusion_pytorch_model.bin", "vae": "diffusion_pytorch_model.bin",
              "text_encoder": "pytorch_model.bin"}


@dataclass
class DiffusersModel:
    """A diffusers folder read into our layout: the state dict and what the folder says about the model."""

    state_dict: dict[str, torch.Tensor]
    prediction_type: str  # "epsilon" or "v_prediction"
    open_clip: bool  # SD 2 text encoder (OpenCLIP layout in our checkpoints)
    unet_file: Path


def is_diffusers_folder(path: Path) -> bool:
    """Whether ``path`` is a folder holding a diffusers ``model_index.json``."""
    return path.is_dir() and (path / INDEX).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object file; CheckpointError naming the file when it is missing or broken."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"diffusers folder: '{path}' is missing; the folder is incomplete (download or "
                              f"convert it again)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"diffusers folder: cannot read '{path}': {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"diffusers folder: '{path}' is not a JSON object")
    return data


def weights_file(folder: Path, part: str) -> Path:
    """The weights file of a component: ``<stem>.safetensors``, else an fp16 variant, else the ``.bin``."""
    sub, stem = folder / part, _WEIGHT_STEMS[part]
    for name in (f"{stem}.safetensors", f"{stem}.fp16.safetensors", _BIN_NAMES[part],
                 _BIN_NAMES[part].replace(".bin", ".fp16.bin")):
        if (sub / name).is_file():
            return sub / name
    if any(sub.glob("*.index.json")):
        raise CheckpointError(f"diffusers folder: '{sub}' holds sharded weights, which are not supported; save the "
                              f"component unsharded (e.g. save_pretrained(..., max_shard_size='100GB'))")
    raise CheckpointError(f"diffusers folder: no weights in '{sub}' (expected {stem}.safetensors or "
                          f"{_BIN_NAMES[part]}); the folder is incomplete")


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A component's tensors as stored (float16 variants are cast when loaded into the model)."""
    if path.suffix == ".bin":
        logger.info("reading '%s' with the safe unpickler (no code is run)", path)
    state_dict, _ = read_checkpoint(path)
    return state_dict


def unet_params(config: Mapping[str, Any]) -> dict[str, Any]:
    """The few ``UNetModel`` params the key mapping needs, from a diffusers ``unet/config.json``."""
    types = config.get("down_block_types") or []
    return {"num_res_blocks": int(config.get("layers_per_block", 2)),
            "channel_mult": [1] * len(config.get("block_out_channels") or types),
            "attention_resolutions": [2 ** i for i, t in enumerate(types) if "CrossAttn" in t]}


def vae_ddconfig(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``ddconfig`` params the key mapping needs, from a diffusers ``vae/config.json``."""
    return {"num_res_blocks": int(config.get("layers_per_block", 2)),
            "ch_mult": [1] * len(config.get("block_out_channels") or [])}


def _converted(part: str, convert: Any, *args: Any) -> dict[str, torch.Tensor]:
    """Run one converter; a key that fits no block becomes a CheckpointError naming the component."""
    try:
        return convert(*args)
    except KeyError as e:
        raise CheckpointError(f"diffusers folder: {part} does not fit the SD layout: {e.args[0]}") from None


def _text_state_dict(folder: Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Text encoder in our layout, and whether it is SD 2's OpenCLIP (transformers ``gelu``; SD 1 ``quick_gelu``)."""
    config = _read_json(folder / "text_encoder" / "config.json")
    open_clip = config.get("hidden_act", "quick_gelu") == "gelu"
    sd = _converted("text_encoder", dt.text_from_diffusers, _read_weights(weights_file(folder, "text_encoder")),
                    open_clip)
    if open_clip:  # SD 2 reads the penultimate OpenCLIP block: the folder omits the last one and the projection
        width = int(config["hidden_size"])
        dt.add_unused_open_clip(sd, int(config.get("projection_dim", width)))
    return {dk.TEXT_PREFIX + k: v for k, v in sd.items()}, open_clip


def read_diffusers_folder(folder: Path) -> DiffusersModel:
    """The UNet, VAE and text encoder of a diffusers folder as one state dict in our checkpoint layout."""
    _read_json(folder / INDEX)
    unet_cfg, vae_cfg = _read_json(folder / "unet" / "config.json"), _read_json(folder / "vae" / "config.json")
    unet_file = weights_file(folder, "unet")
    sd = {dk.UNET_PREFIX + k: v for k, v in _converted(
        "unet", dk.unet_from_diffusers, _read_weights(unet_file), unet_params(unet_cfg)).items()}
    sd.update({dk.VAE_PREFIX + k: v for k, v in _converted(
        "vae", dk.vae_from_diffusers, _read_weights(weights_file(folder, "vae")), vae_ddconfig(vae_cfg)).items()})
    text, open_clip = _text_state_dict(folder)
    sd.update(text)
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    sd.update(schedule_buffers(scheduler))
    prediction = scheduler.get("prediction_type", "epsilon")
    if prediction not in ("epsilon", "v_prediction"):
        raise CheckpointError(f"diffusers folder '{folder}': prediction_type '{prediction}' in its scheduler config is "
                              f"not supported (epsilon or v_prediction)")
    return DiffusersModel(sd, prediction, open_clip, unet_file)


_BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}  # diffusers' name -> ours (SD's "linear")


def schedule_buffers(scheduler: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The DDPM schedule buffers a checkpoint carries (``betas``, ``alphas_cumprod`` ...), from a scheduler config."""
    from ldm.modules.diffusionmodules.schedules import ddpm_schedule, make_beta_schedule

    name = scheduler.get("beta_schedule", "scaled_linear")
    if name not in _BETA_SCHEDULES or scheduler.get("trained_betas"):
        raise CheckpointError(f"diffusers folder: beta_schedule '{name}' is not supported (scaled_linear or linear)")
    betas = make_beta_schedule(_BETA_SCHEDULES[name], int(scheduler.get("num_train_timesteps", 1000)),
                               linear_start=float(scheduler.get("beta_start", 0.00085)),
                               linear_end=float(scheduler.get("beta_end", 0.012)))
    return {k: torch.tensor(v, dtype=torch.float32) for k, v in ddpm_schedule(betas).items()}


def sidecar_config(folder: Path) -> Optional[Path]:
    """``<folder>.yaml`` beside the folder (as ``<ckpt>.yaml`` beside a checkpoint), when present."""
    path = folder.parent / f"{folder.name}.yaml"
    return path if path.is_file() else None


def family_config(model: DiffusersModel, folder: Path) -> Path:
    """The inference config for a folder's weights: the family of its keys, eps or v from its scheduler config."""
    from ldm.model_family import CONFIG_DIR, detect_family

    try:
        family = detect_family(model.state_dict, folder.name)
    except ValueError as e:
        raise UsageError(f"cannot infer the config of diffusers folder '{folder}': {e}") from None
    v = model.prediction_type == "v_prediction"
    if family.name in ("sd2", "sd2-v"):
        return CONFIG_DIR / ("v2-inference-v.yaml" if v else "v2-inference.yaml")
    if v:
        raise UsageError(f"diffusers folder '{folder}' is a v-prediction {family.name} model, for which no "
                         f"config ships: pass --config PATH (a config with parameterization: v)")
    if family.config is None:
        raise UsageError(f"cannot infer the config of diffusers folder '{folder}': pass --config PATH")
    return Path(family.config)

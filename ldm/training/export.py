"""What the trainer writes for generation: inference weights (EMA or raw) with their inference config beside them.

An export ``x.safetensors`` gets ``x.yaml``: the training config's ``model`` section without what only training
needs (learning rate, scheduler, caption dropout, ``ckpt_path``, the model's own EMA copy, the autoencoder's
discriminator), so that ``txt2img --ckpt x.safetensors`` finds it without ``--config``.
"""
from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Mapping

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

# Constructor arguments that matter only while training (or that would load other files at inference).
TRAINING_ONLY_PARAMS = ("base_learning_rate", "ckpt_path", "ignore_keys", "load_only_unet", "reset_ema",
                        "reset_num_ema_updates", "scheduler_config", "ucg_training", "monitor", "make_it_fit",
                        "ema_decay")
# The loss module of the inference configs (the original SD configs use it too): no weights, no code run.
NO_LOSS = {"target": "torch.nn.Identity"}
AUTOENCODER_TARGETS = ("ldm.models.autoencoder.AutoencoderKL",)


def file_mode() -> int:
    """Permission bits of a newly written file under the current umask (0644 for the usual umask 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _strip(section: Mapping[str, Any]) -> dict[str, Any]:
    """A ``target``/``params`` section (and the sections nested in it) without training-only arguments."""
    out = copy.deepcopy(dict(section))
    params = {k: v for k, v in dict(out.get("params") or {}).items() if k not in TRAINING_ONLY_PARAMS}
    for key, value in params.items():
        if isinstance(value, Mapping) and "target" in value:
            params[key] = _strip(value)
    if "lossconfig" in params:
        params["lossconfig"] = dict(NO_LOSS)
    if out.get("target") not in AUTOENCODER_TARGETS and "unet_config" in params:
        params["use_ema"] = False  # one set of weights; the loader chooses EMA or raw from a full checkpoint
    out["params"] = params
    return out


def targets(section: Any) -> Iterator[str]:
    """Every ``target:`` named anywhere in ``section``."""
    if isinstance(section, Mapping):
        if isinstance(section.get("target"), str):
            yield section["target"]
        for value in section.values():
            yield from targets(value)
    elif isinstance(section, (list, tuple)):
        for value in section:
            yield from targets(value)


def inference_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any] | None:
    """``{"model": ...}`` for generation from a training config; None when it names targets that inference
    configs may not (anything but the project's classes and ``torch.nn.Identity``: :mod:`ldm.config_policy`)."""
    plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else copy.deepcopy(dict(cfg))
    model = plain.get("model")
    if not isinstance(model, Mapping) or "target" not in model:
        return None
    from ldm.config_policy import refusal

    config = {"model": _strip(model)}
    foreign = sorted({t for t in targets(config) if refusal(t)})  # what generation would refuse to build
    if foreign:
        logger.warning("no inference config written: the model config names targets outside this project (%s); "
                       "pass --config when generating", ", ".join(foreign))
        return None
    return config


def sidecar_path(weights: Path) -> Path:
    """Where the config of ``weights`` goes: ``x.safetensors`` -> ``x.yaml`` (what the generation scripts read)."""
    return weights.with_suffix(".yaml")


def write_inference_config(config: Mapping[str, Any], weights: Path) -> Path:
    """Write ``config`` beside ``weights`` atomically (mode 0644 under the usual umask); returns its path."""
    from ldm.training.checkpoint import atomic_write_bytes

    path = sidecar_path(weights)
    text = "# inference config written by scripts/train.py for " + weights.name + "\n"
    text += OmegaConf.to_yaml(OmegaConf.create(dict(config)))
    atomic_write_bytes(text.encode(), path)
    return path

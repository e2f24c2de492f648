"""Training configuration: YAML files merged in order, dotted command-line overrides, the trainer section."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)


@dataclass
class TrainerSettings:
    """The ``trainer:`` section (older configs: ``lightning.trainer`` plus the image-logger/checkpoint callbacks)."""

    max_steps: int = 1000
    precision: str = "32"  # "32", "16"/"fp16"/"16-mixed" (autocast + GradScaler), "bf16"/"bf16-mixed"
    accumulate_grad_batches: int = 1
    gradient_clip_val: float = 0.0
    checkpoint_every_n_steps: int = 1000
    keep_last_n_checkpoints: int | None = None
    log_every_n_steps: int = 10
    image_log_every_n_steps: int = 0
    val_every_n_steps: int = 0
    limit_val_batches: int = 8
    log_images: int = 4
    sample_steps: int = 20
    sample_guidance_scale: float = 5.0
    sample_eta: float = 0.0
    export_ema: bool = True
    tensorboard: bool = True
    progress_bar: bool = True
    device: str | None = None
    cudnn_benchmark: bool = True

    def __post_init__(self) -> None:
        self.precision = normalize_precision(self.precision)
        if self.accumulate_grad_batches < 1:
            raise ValueError("trainer.accumulate_grad_batches must be >= 1")
        if self.max_steps < 1:
            raise ValueError("trainer.max_steps must be >= 1")


_PRECISIONS = {"32": "32", "32-true": "32", "fp32": "32", "16": "16", "16-mixed": "16", "fp16": "16",
               "bf16": "bf16", "bf16-mixed": "bf16"}


def normalize_precision(value: Any) -> str:
    """"32", "16" or "bf16" from the spellings people use (16, "16-mixed", "fp16", "bf16-mixed", ...)."""
    key = str(value).lower()
    if key not in _PRECISIONS:
        raise ValueError(f"unknown trainer.precision '{value}'; use 32, 16 (fp16 + GradScaler) or bf16")
    return _PRECISIONS[key]


# Lightning trainer / callback keys of the original configs and what they mean here.
_LIGHTNING_KEYS = {"max_steps": "max_steps", "precision": "precision",
                   "accumulate_grad_batches": "accumulate_grad_batches", "gradient_clip_val": "gradient_clip_val",
                   "val_check_interval": "val_every_n_steps", "limit_val_batches": "limit_val_batches",
                   "log_every_n_steps": "log_every_n_steps"}


def _from_lightning(cfg: DictConfig) -> dict[str, Any]:
    light = cfg.get("lightning") or {}
    out: dict[str, Any] = {}
    for key, value in (light.get("trainer") or {}).items():
        if key not in _LIGHTNING_KEYS or value is None:
            continue
        if key == "val_check_interval" and isinstance(value, float):
            continue  # a fraction of an epoch: there are no epochs here
        out[_LIGHTNING_KEYS[key]] = value
    image_logger = ((light.get("callbacks") or {}).get("image_logger") or {}).get("params") or {}
    if "batch_frequency" in image_logger:
        out["image_log_every_n_steps"] = image_logger["batch_frequency"]
    if "max_images" in image_logger:
        out["log_images"] = image_logger["max_images"]
    ckpt = (light.get("modelcheckpoint") or {}).get("params") or {}
    if ckpt.get("every_n_train_steps"):
        out["checkpoint_every_n_steps"] = ckpt["every_n_train_steps"]
    return out


def trainer_settings(cfg: DictConfig) -> TrainerSettings:
    """Trainer settings from ``cfg.trainer``, falling back to the Lightning sections of older configs."""
    values = _from_lightning(cfg)
    own = cfg.get("trainer") or {}
    values.update(OmegaConf.to_container(own, resolve=True) if isinstance(own, DictConfig) else dict(own))
    known = {f.name for f in fields(TrainerSettings)}
    unknown = sorted(set(values) - known)
    if unknown:
        logger.warning("trainer: ignoring unknown settings %s (known: %s)", unknown, sorted(known))
    return TrainerSettings(**{k: v for k, v in values.items() if k in known})


def load_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files in order, then dotted overrides such as ``model.params.base_learning_rate=1e-4``."""
    if not paths:
        raise ValueError("no config given: pass --base config.yaml (several are merged in order)")
    configs = []
    for p in paths:
        p = Path(p)
        if not p.is_file():
            raise FileNotFoundError(f"config file '{p}' not found")
        configs.append(OmegaConf.load(p))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must look like key.sub=value, got {bad}")
    cfg = OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(overrides)))
    for section in ("model", "data"):
        if section not in cfg:
            raise ValueError(f"the config has no '{section}:' section (files: {[str(p) for p in paths]})")
    return cfg


def check_complete(cfg: DictConfig) -> None:
    """Raise a ValueError naming every value still marked ``???`` (to be given on the command line)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"the config leaves {missing} unset (marked ???): give them on the command line, e.g. "
                         f"{missing[0]}=/path/to/...")


def base_learning_rate(cfg: DictConfig) -> float:
    """``model.base_learning_rate`` (where the original configs keep it), or ``model.params.base_learning_rate``."""
    for value in (cfg.model.get("base_learning_rate"), (cfg.model.get("params") or {}).get("base_learning_rate")):
        if value is not None:
            return float(value)
    raise ValueError("no learning rate: set model.base_learning_rate (e.g. 1.0e-4)")


def effective_learning_rate(base_lr: float, batch_size: int, accumulate: int, world_size: int,
                            scale_lr: bool) -> float:
    """Original rule: with ``--scale_lr`` the lr is ``accumulate * world_size * batch_size * base_lr``."""
    if not scale_lr:
        return base_lr
    lr = accumulate * world_size * batch_size * base_lr
    logger.info("learning rate %.2e = %d (accumulate) * %d (processes) * %d (batch size) * %.2e (base lr)",
                lr, accumulate, world_size, batch_size, base_lr)
    return lr


def model_config(cfg: DictConfig) -> dict[str, Any]:
    """The ``model`` section as plain data for ``instantiate_from_config`` (``base_learning_rate`` removed)."""
    section = OmegaConf.to_container(cfg.model, resolve=True)
    section.pop("base_learning_rate", None)
    params = dict(section.get("params") or {})
    params.pop("base_learning_rate", None)
    section["params"] = params
    return section


def settings_dict(settings: TrainerSettings) -> dict[str, Any]:
    """Plain-data view of the settings (for logs and checkpoints)."""
    return dataclasses.asdict(settings)

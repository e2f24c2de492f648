"""Training configuration: YAML files merged in order, dotted command-line overrides, the trainer section."""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A training config (files, overrides, values) that cannot run: one readable line naming the fix."""


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
        for name in ("max_steps", "accumulate_grad_batches", "checkpoint_every_n_steps", "log_every_n_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be a whole number >= 1, got {getattr(self, name)!r}")
        for name in ("image_log_every_n_steps", "val_every_n_steps", "limit_val_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name} must be a whole number >= 0, got {getattr(self, name)!r}")


_PRECISIONS = {"32": "32", "32-true": "32", "fp32": "32", "16": "16", "16-mixed": "16", "fp16": "16",
               "bf16": "bf16", "bf16-mixed": "bf16"}


def normalize_precision(value: Any) -> str:
    """"32", "16" or "bf16" from the spellings people use (16, "16-mixed", "fp16", "bf16-mixed", ...)."""
    key = str(value).lower()
    if key not in _PRECISIONS:
        raise ConfigError(f"unknown trainer.precision '{value}'; use 32, 16 (fp16 + GradScaler) or bf16")
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
        raise ConfigError(f"unknown trainer setting(s) {', '.join('trainer.' + k for k in unknown)}; check the "
                          f"spelling (known: {', '.join(sorted(known))})")
    return TrainerSettings(**values)


def load_config(paths: Sequence[str | Path], overrides: Sequence[str] = ()) -> DictConfig:
    """Merge YAML files in order, then dotted overrides such as ``model.params.base_learning_rate=1e-4``."""
    from omegaconf.errors import OmegaConfBaseException

    if not paths:
        raise ConfigError("no config given: pass --base config.yaml (several are merged in order)")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key.sub=value, got {bad}")
    configs = [_read_yaml(Path(p)) for p in paths]
    try:
        cfg = OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(f"cannot apply the overrides {list(overrides)}: {_one_line(e)}") from None
    for section in ("model", "data"):
        if not isinstance(cfg.get(section), DictConfig):
            raise ConfigError(f"the config has no '{section}:' section (files: {', '.join(str(p) for p in paths)})")
    return cfg


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _read_yaml(path: Path) -> DictConfig:
    """One config file; ConfigError when it is missing, unreadable or not a mapping."""
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        cfg = OmegaConf.load(path)
    except Exception as e:  # noqa: BLE001 - yaml and omegaconf errors of every kind
        raise ConfigError(f"cannot read config '{path}': {_one_line(e)}") from None
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config '{path}' is not a mapping of sections (model:, data:, trainer:)")
    return cfg


def check_complete(cfg: DictConfig) -> None:
    """Raise a ValueError naming every value still marked ``???`` (to be given on the command line)."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"the config leaves {missing} unset (marked ???): give them on the command line, e.g. "
                         f"{missing[0]}=/path/to/...")


def base_learning_rate(cfg: DictConfig) -> float:
    """``model.base_learning_rate`` (where the original configs keep it), or ``model.params.base_learning_rate``."""
    for value in (cfg.model.get("base_learning_rate"), (cfg.model.get("params") or {}).get("base_learning_rate")):
        if value is not None:
            return float(value)
    raise ConfigError("no learning rate: set model.base_learning_rate (e.g. 1.0e-4)")


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


def _signature(target: str) -> tuple[set[str] | None, set[str]]:
    """(keyword arguments the class or function ``target`` takes, None: any; the ones it requires)."""
    import inspect

    from ldm.util import get_obj_from_str

    try:
        obj = get_obj_from_str(target)
    except ImportError as e:
        raise ConfigError(_one_line(e)) from None
    try:
        params = inspect.signature(obj.__init__ if inspect.isclass(obj) else obj).parameters
    except (TypeError, ValueError):
        return None, set()
    named = {n: p for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    required = {n for n, p in named.items() if p.default is p.empty}
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None, required
    return set(named), required


def _accepted(target: str) -> set[str] | None:
    """Keyword arguments the class or function named by ``target`` takes (None: it takes any)."""
    return _signature(target)[0]


def _check_section(node: DictConfig, where: str, aliases: dict[str, str]) -> None:
    """Check one ``target``/``params`` section and the sections nested in its params."""
    target = node.get("target")
    params = node.get("params")
    if not isinstance(params, DictConfig):
        return
    if isinstance(target, str):
        accepted, required = _signature(aliases.get(target, target))
        present = set(params.keys())  # ``???`` values count as present: check_complete names them all
        absent = sorted(k for k in required if k not in present or params._get_node(k)._is_none())
        if absent:
            raise ConfigError(f"{where}.params: {target} needs {', '.join(map(repr, absent))}; add it to the config "
                              f"or give it on the command line ({where}.params.{absent[0]}=...)")
        unknown = sorted(set(params.keys()) - accepted) if accepted is not None else []
        for key in list(unknown):
            if OmegaConf.is_missing(params, key):  # e.g. an image folder's root after switching to tar shards
                logger.info("%s.params.%s: unset (???) and not an argument of %s; dropped", where, key, target)
                del params[key]
                unknown.remove(key)
        if unknown:
            import difflib

            close = [m for k in unknown for m in difflib.get_close_matches(k, sorted(accepted), n=1)]
            hint = f"did you mean {', '.join(close)}?" if close else f"it takes {', '.join(sorted(accepted))}"
            raise ConfigError(f"{where}.params: {target} takes no {', '.join(map(repr, unknown))} ({hint})")
    for key in params.keys():
        value = params._get_node(key)
        if isinstance(value, DictConfig) and not OmegaConf.is_missing(params, key) and "target" in value:
            _check_section(value, f"{where}.params.{key}", aliases)


def _split_needs_support(cfg: DictConfig) -> None:
    """``validation_fraction`` splits datasets that take ``split``; others (tar shards) get no validation set."""
    params = cfg.data.get("params")
    if not isinstance(params, DictConfig) or params.get("validation") is not None:
        return
    train = params.get("train")
    if not params.get("validation_fraction") or not isinstance(train, DictConfig) or "target" not in train:
        return
    accepted = _accepted(str(train.target))
    if accepted is not None and "split" not in accepted:
        logger.warning("data.params.validation_fraction: %s cannot be split by a fraction, so there is no "
                       "validation set (give data.params.validation, e.g. other shards with repeat: false)",
                       train.target)
        params.validation_fraction = 0.0


def check_sections(cfg: DictConfig) -> None:
    """Check every ``target``/``params`` of the model and data sections against its constructor (in place).

    Unset (``???``) params the target does not take are dropped; any other unknown param is a ConfigError.
    """
    from ldm.data.datamodule import TARGET_ALIASES

    _split_needs_support(cfg)
    _check_section(cfg.model, "model", {})
    _check_section(cfg.data, "data", dict(TARGET_ALIASES))

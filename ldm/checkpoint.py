"""The one place that reads checkpoints and loads weights into models: every route goes through it.

It owns: safe reading of ``.safetensors``/``.ckpt`` files (:func:`read_checkpoint`, :func:`load_state_dict_file`,
damaged-tensor checks), the EMA choice of full checkpoints (:func:`load_weights`, :func:`apply_ema`), the explicit
lists of ignorable keys (:data:`IGNORABLE_UNEXPECTED`, :data:`IGNORABLE_MISSING`), readable mismatch reports
(:func:`mismatch_message`, :class:`CheckpointError`), the YAML ``ckpt_path`` route with its ``ignore_keys``
(:func:`drop_ignored_keys`, :func:`load_config_checkpoint`), building a model from a config plus a checkpoint
(:func:`load_model_from_config`) and atomic safetensors writes (:func:`save_safetensors`). LoRA merging
(``ldm/modules/lora/``), VAE swaps and diffusers folders (``ldm/convert/``) read their files through it.

The file reading and writing itself lives in ``ldm/checkpoint_files.py`` (re-exported here): it never executes
code from a file (``.safetensors`` is plain data; pickles go through ``torch.load(weights_only=True)``).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ldm.checkpoint_files import (PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, CheckpointError, _read_pickle,
                                  load_state_dict_file, read_checkpoint, save_safetensors)

__all__ = ["PICKLE_SUFFIXES", "SAFETENSORS_SUFFIXES", "CheckpointError", "_read_pickle", "load_state_dict_file",
           "read_checkpoint", "save_safetensors", "EMA_PREFIX", "EMA_SCALARS", "IGNORABLE_UNEXPECTED",
           "IGNORABLE_MISSING", "TRAINING_ONLY_PREFIXES", "LoadReport", "apply_ema", "damaged_tensors",
           "drop_ignored_keys", "drop_training_ema", "ema_key", "has_ema", "load_config_checkpoint",
           "load_model_from_config", "load_weights", "mismatch_message"]

logger = logging.getLogger(__name__)

EMA_PREFIX = "model_ema."
EMA_SCALARS = ("model_ema.decay", "model_ema.num_updates")

# Keys a real checkpoint may hold that a correctly built model may lack (or the reverse). Each entry is tested.
IGNORABLE_UNEXPECTED = (
    # transformers < 4.31 saved this buffer; newer ones do not: both must load.
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    # EMA bookkeeping scalars, kept in some EMA-only releases.
    *EMA_SCALARS,
    # open_clip's causal mask: non-persistent in open_clip, but a few converted files saved it.
    "cond_stage_model.model.attn_mask",
    # the same mask in SDXL files (OpenCLIP-bigG is embedder 1 of the base, 0 of the refiner)
    "conditioner.embedders.0.model.attn_mask", "conditioner.embedders.1.model.attn_mask",
)
IGNORABLE_MISSING = ("cond_stage_model.transformer.text_model.embeddings.position_ids",
                     # SDXL files may lack these buffers; the model fills them when loading (load pre-hooks)
                     "conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "denoiser.sigmas")
# Training-only weights of a diffusion model that the YAML ``ckpt_path`` route may find absent or unused (as the
# original did): the first stage's losses (discriminator, LPIPS) and the learned loss weighting ``logvar``.
TRAINING_ONLY_PREFIXES = ("first_stage_model.loss.", "logvar")


def ema_key(param_name: str) -> str:
    """Full-checkpoint EMA key of a ``model.*`` parameter: ``model.a.b.c`` -> ``model_ema.abc``."""
    if not param_name.startswith("model."):
        raise ValueError(f"EMA keys exist only for 'model.*' parameters, not '{param_name}'")
    return EMA_PREFIX + param_name[len("model."):].replace(".", "")


def has_ema(sd: Mapping[str, Any]) -> bool:
    """True when ``sd`` is a full checkpoint holding EMA copies (``model_ema.<name>``) of the UNet weights."""
    return any(k.startswith(EMA_PREFIX) and k not in EMA_SCALARS for k in sd)


def apply_ema(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copy of ``sd`` where every ``model.*`` tensor is replaced by its EMA twin and ``model_ema.*`` are dropped."""
    out = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
    missing = []
    for k in out:
        if k.startswith("model."):
            e = ema_key(k)
            if e in sd:
                out[k] = sd[e]
            else:
                missing.append(k)
    if missing:
        raise CheckpointError(f"the checkpoint's EMA weights are incomplete: {len(missing)} 'model.*' tensors have "
                              f"no EMA copy (first: {missing[0]}). Load the raw weights instead (use_ema=False).")
    return out


@dataclass
class LoadReport:
    """What happened when a state_dict was loaded into a model."""

    used_ema: bool = False
    ignored: list[str] = field(default_factory=list)
    had_both: bool = False  # the checkpoint held raw and EMA UNet weights, and one set was chosen


def _first(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def _all_finite(t: torch.Tensor) -> bool:
    """True when a float tensor holds no NaN/inf (min and max propagate them: ~50x faster than isfinite().all())."""
    try:
        low, high = torch.aminmax(t)
    except (RuntimeError, NotImplementedError):  # dtypes without aminmax (float8)
        low, high = torch.aminmax(t.float())
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def damaged_tensors(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                    source: str = "checkpoint") -> str | None:
    """One line naming the tensors that would load as garbage, or None: a non-float tensor (int8, bool...) where
    the model has float weights (it would be cast silently), or a float tensor holding NaN/inf values."""
    wrong_type, not_finite = [], []
    for k, model_t in model_sd.items():
        t = sd.get(k)
        if t is None or t.device.type == "meta" or tuple(t.shape) != tuple(model_t.shape):
            continue
        if model_t.is_floating_point() and not t.is_floating_point():
            wrong_type.append(f"{k} ({str(t.dtype).replace('torch.', '')})")
        elif t.is_floating_point() and t.numel() and not _all_finite(t):
            not_finite.append(k)
    parts = []
    if wrong_type:
        parts.append(f"{len(wrong_type)} tensors are not floating point where the model has float weights "
                     f"(first: {_first(wrong_type, 3)})")
    if not_finite:
        parts.append(f"{len(not_finite)} tensors hold NaN/inf values (first: {_first(not_finite, 3)})")
    if not parts:
        return None
    return (f"the {source} is damaged: {'; '.join(parts)}. It would make black or noise pictures; get or convert "
            f"the file again.")


def mismatch_message(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor],
                     source: str = "checkpoint", target: str = "model") -> str | None:
    """One readable line on missing / unexpected / wrong-shape keys with a hint (full lists at DEBUG level), or
    on damaged tensors (:func:`damaged_tensors`); None when ``sd`` fits ``model_sd``."""
    missing = [k for k in model_sd if k not in sd and k not in IGNORABLE_MISSING]
    unexpected = [k for k in sd if k not in model_sd and k not in IGNORABLE_UNEXPECTED]
    shapes = [f"{k}: {source} {list(sd[k].shape)} vs {target} {list(model_sd[k].shape)}"
              for k in model_sd if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
    if not (missing or unexpected or shapes):
        return damaged_tensors(model_sd, sd, source)
    logger.debug("%s vs %s: missing %s; unexpected %s; wrong shapes %s", source, target, missing, unexpected, shapes)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys (first: {_first(missing, 3)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first: {_first(unexpected, 3)})")
    if shapes:
        parts.append(f"{len(shapes)} keys with the wrong shape (first: {_first(shapes, 2)})")
    from ldm.model_family import describe_mismatch_hint
    hint = describe_mismatch_hint(sd, model_sd)
    return f"the {source} does not fit the {target}: {'; '.join(parts)}" + (f". Hint: {hint}" if hint else "")


def drop_training_ema(model: torch.nn.Module) -> bool:
    """Remove the model's own EMA copy (``use_ema: true`` in a training config) so it runs one set of weights.

    For inference: :func:`load_weights` then puts the chosen set (EMA or raw) under ``model.*``. Returns True
    when there was one.
    """
    if not isinstance(getattr(model, "model_ema", None), torch.nn.Module):
        return False
    del model.model_ema
    model.use_ema = False
    return True


def _training_only_keys(model_sd: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor]) -> set[str]:
    """Model keys of training-only modules the checkpoint leaves out: the autoencoder's ``loss.*`` (discriminator,
    LPIPS), which inference exports drop."""
    if any(k.startswith("loss.") for k in sd):
        return set()
    return {k for k in model_sd if k.startswith("loss.")}


def load_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], use_ema: bool | None = None,
                 source: str = "checkpoint") -> LoadReport:
    """Load ``sd`` strictly into ``model``; EMA weights go into the model when ``use_ema`` (None: when present).

    Full checkpoints carry both raw (``model.*``) and EMA (``model_ema.*``) UNet weights. A model that has its own
    ``model_ema`` (training) receives both as they are; otherwise the chosen set is put under ``model.*``.
    An autoencoder's training-only ``loss.*`` weights may be absent from ``sd`` (inference exports).
    """
    model_sd = model.state_dict()
    skipped = _training_only_keys(model_sd, sd)
    model_sd = {k: v for k, v in model_sd.items() if k not in skipped}
    report = LoadReport()
    model_has_ema = any(k.startswith(EMA_PREFIX) for k in model_sd)
    if not model_has_ema and has_ema(sd):
        want = True if use_ema is None else use_ema
        report.had_both = True
        if want:
            sd = apply_ema(sd)
            report.used_ema = True
        else:
            sd = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX)}
        logger.info("full checkpoint: using its %s UNet weights", "EMA" if want else "raw (non-EMA)")
    elif use_ema and not has_ema(sd):
        logger.info("the checkpoint has no separate EMA weights; using the weights it has")
    msg = mismatch_message(model_sd, sd, source=source)
    if msg:
        raise CheckpointError(msg)
    report.ignored = [k for k in sd if k not in model_sd]
    sd = {k: v for k, v in sd.items() if k in model_sd}
    result = model.load_state_dict(sd, strict=False)
    still_missing = [k for k in result.missing_keys if k not in IGNORABLE_MISSING and k not in skipped]
    if still_missing:  # pragma: no cover - mismatch_message catches these first
        raise CheckpointError(f"missing keys after loading: {_first(still_missing)}")
    if report.ignored:
        logger.debug("ignored checkpoint keys: %s", report.ignored)
    return report


def drop_ignored_keys(sd: dict[str, torch.Tensor], ignore_keys: Sequence[str]) -> list[str]:
    """Remove (in place) the keys of ``sd`` starting with any ``ignore_keys`` prefix (the YAML contract)."""
    prefixes = tuple(ignore_keys)
    dropped = [k for k in sd if prefixes and k.startswith(prefixes)]
    for k in dropped:
        del sd[k]
    if dropped:
        logger.info("ignoring %d checkpoint keys starting with %s", len(dropped), list(prefixes))
    return dropped


def _config_ema_policy(model_sd: Mapping[str, torch.Tensor], sd: dict[str, torch.Tensor],
                       source: str) -> set[str]:
    """The original's EMA leniency on the ``ckpt_path`` route; returns the model keys allowed to stay unloaded.

    A training model (``use_ema: true``) may start from a checkpoint without EMA copies (its EMA then keeps its
    initial values: ``reset_ema: true`` copies the loaded weights); a model without EMA takes the raw weights of a
    full checkpoint and leaves its ``model_ema.*`` aside.
    """
    model_has_ema = any(k.startswith(EMA_PREFIX) for k in model_sd)
    if model_has_ema and not has_ema(sd):
        logger.warning("%s has no EMA weights: the model's EMA keeps its initial values (set reset_ema: true to "
                       "start it from the loaded weights)", source)
        return {k for k in model_sd if k.startswith(EMA_PREFIX) and k not in sd}
    if not model_has_ema and has_ema(sd):
        logger.info("%s holds EMA weights; the model has no EMA, so its raw weights are loaded", source)
        for k in [k for k in sd if k.startswith(EMA_PREFIX)]:
            del sd[k]
    return set()


def load_config_checkpoint(target: torch.nn.Module, sd: dict[str, torch.Tensor], path: str | os.PathLike,
                           ignore_keys: Sequence[str] = (), allow_unexpected: Sequence[str] = (),
                           allow_missing: Sequence[str] = (), hint: str = "") -> LoadReport:
    """Load a YAML ``ckpt_path`` state_dict into ``target`` strictly, within the original's leniency.

    May differ: model keys under an ``ignore_keys`` prefix (already dropped from ``sd`` by
    :func:`drop_ignored_keys`), :data:`IGNORABLE_UNEXPECTED`/:data:`IGNORABLE_MISSING`, checkpoint keys under an
    ``allow_unexpected`` prefix (e.g. training losses), model keys under an ``allow_missing`` prefix that the
    checkpoint lacks (they keep their initial values), an autoencoder's absent ``loss.*`` and the EMA cases of
    :func:`_config_ema_policy`. Anything else is one :class:`CheckpointError` naming the file and the keys.
    """
    source = f"checkpoint '{path}'"
    model_sd = target.state_dict()
    skipped = _training_only_keys(model_sd, sd) | _config_ema_policy(model_sd, sd, source)
    prefixes, absent_ok = tuple(ignore_keys), tuple(allow_missing)
    skipped |= {k for k in model_sd if k not in sd and absent_ok and k.startswith(absent_ok)}
    compare = {k: v for k, v in model_sd.items() if k not in skipped and not (prefixes and k.startswith(prefixes))}
    allowed = tuple(allow_unexpected)
    report = LoadReport(ignored=[k for k in sd if k not in model_sd and allowed and k.startswith(allowed)])
    checked = {k: v for k, v in sd.items() if k not in report.ignored}
    msg = mismatch_message(compare, checked, source=source, target=f"{type(target).__name__} of the config")
    if msg:
        raise CheckpointError(msg + (f". {hint}" if hint else ""))
    if report.ignored:
        logger.info("ignored %d keys of %s the model does not use (first: %s)", len(report.ignored), source,
                    _first(report.ignored, 3))
    target.load_state_dict({k: v for k, v in sd.items() if k in model_sd}, strict=False)
    logger.info("Restored %s", source)
    return report


def load_model_from_config(config: Any, ckpt: str | os.PathLike | None, use_ema: bool | None = None,
                           device: str | torch.device = "cpu") -> torch.nn.Module:
    """Instantiate ``config`` (a ``model:`` section or its content) and load ``ckpt`` into it; returns eval()."""
    from ldm.util import instantiate_from_config

    cfg = config.model if hasattr(config, "model") or (isinstance(config, Mapping) and "model" in config) else config
    if isinstance(cfg, Mapping) and "model" in cfg and "target" not in cfg:
        cfg = cfg["model"]
    model = instantiate_from_config(cfg)
    if ckpt is not None:
        drop_training_ema(model)  # a training config's use_ema: the checkpoint's weights are chosen below
        sd = load_state_dict_file(ckpt)
        load_weights(model, sd, use_ema=use_ema, source=f"checkpoint '{Path(ckpt).name}'")
        del sd
    return model.to(device).eval()

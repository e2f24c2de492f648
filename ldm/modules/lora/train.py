"""LoRA adapters for training: low-rank ``up @ down`` branches added to the UNet's attention projections (base
weights frozen), and their export as a kohya / web-UI ``.safetensors`` file that ``--lora`` and diffusers load.

The adapters hang on the adapted ``nn.Linear`` as children ``lora_down`` / ``lora_up`` (with a ``lora_alpha``
buffer) and act through a forward hook, so the base weights keep their names and a training checkpoint holds
base + adapters (resumable as any run). The branch is ``up(down(dropout(x))) * alpha / rank``, ``up`` starts at
zero: training starts exactly at the base model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ldm.modules.lora.targets import lora_targets

logger = logging.getLogger(__name__)
DEFAULT_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class LoraTrainConfig:
    """The ``lora:`` section of a training config."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    modules: tuple[str, ...] = DEFAULT_MODULES

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if not self.modules:
            raise ValueError("lora.modules is empty; name the layers to adapt, e.g. [to_q, to_k, to_v, to_out.0]")


def lora_config(section: Mapping[str, Any] | None) -> LoraTrainConfig:
    """A :class:`LoraTrainConfig` from a config mapping; ValueError naming an unknown key."""
    section = dict(section or {})
    if "text_encoder" in section:
        raise ValueError("lora.text_encoder is not supported yet; adapt the UNet only")
    known = {"rank", "alpha", "dropout", "modules"}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"lora: unknown setting(s) {unknown}; it takes {sorted(known)}")
    if "modules" in section:
        section["modules"] = tuple(str(m) for m in section["modules"])
    return LoraTrainConfig(**section)


def _branch(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    """Forward hook: the base output plus the low-rank branch."""
    x = inputs[0]
    x = nn.functional.dropout(x, module.lora_dropout, module.training)
    down = module.lora_down
    scale = module.lora_alpha / down.out_features
    return output + module.lora_up(down(x.to(down.weight.dtype))).to(output.dtype) * scale.to(output.dtype)


def _attach(layer: nn.Linear, name: str, cfg: LoraTrainConfig) -> None:
    """Give ``layer`` its down / up factors (up zero) and the hook."""
    weight = layer.weight
    layer.lora_down = nn.Linear(layer.in_features, cfg.rank, bias=False, device=weight.device)
    layer.lora_up = nn.Linear(cfg.rank, layer.out_features, bias=False, device=weight.device)
    nn.init.kaiming_uniform_(layer.lora_down.weight, a=5 ** 0.5)
    nn.init.zeros_(layer.lora_up.weight)
    layer.register_buffer("lora_alpha", torch.tensor(float(cfg.alpha), device=weight.device))
    layer.lora_dropout = float(cfg.dropout)
    layer.lora_name = name
    layer.register_forward_hook(_branch)


def add_lora(model: nn.Module, cfg: LoraTrainConfig) -> list[nn.Parameter]:
    """Freeze every weight of ``model`` (a LatentDiffusion) and add adapters to the UNet's attention layers named by
    ``cfg.modules``; returns the adapter parameters (the only ones that require gradients)."""
    unet = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(unet, nn.Module):
        raise ValueError(f"lora: only a diffusion model's UNet can be adapted, not a {type(model).__name__}; "
                         f"remove the lora: section")
    names = {t.key: alias for alias, t in lora_targets(model).items()
             if alias.startswith("lora_unet_") and not alias.startswith(("lora_unet_input_", "lora_unet_middle_",
                                                                         "lora_unet_output_"))}
    for p in model.parameters():
        p.requires_grad_(False)
    chosen = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Linear) and ".attn" in n
              and any(n.endswith("." + k) for k in cfg.modules)]
    if not chosen:
        raise ValueError(f"lora.modules {list(cfg.modules)} match no attention layer of the UNet")
    for name, layer in chosen:
        _attach(layer, names[f"model.diffusion_model.{name}.weight"], cfg)
    if getattr(model, "use_ema", False):
        logger.info("LoRA training: the model's EMA is switched off (only the adapters change)")
        model.use_ema = False
    params = adapter_parameters(model)
    logger.info("LoRA: %d layers adapted (rank %d, alpha %g), %.2fM trainable values", len(chosen), cfg.rank,
                cfg.alpha, sum(p.numel() for p in params) / 1e6)
    return params


def adapted_layers(model: nn.Module) -> list[nn.Linear]:
    """The layers of ``model`` that carry adapters."""
    return [m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, "lora_up")]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' factors, made trainable."""
    params = []
    for layer in adapted_layers(model):
        for p in (layer.lora_down.weight, layer.lora_up.weight):
            p.requires_grad_(True)
            params.append(p)
    return params


def kohya_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as a kohya / web-UI LoRA: ``lora_unet_<diffusers name>.lora_down/.lora_up/.alpha`` (float32)."""
    sd: dict[str, torch.Tensor] = {}
    for layer in adapted_layers(model):
        sd[f"{layer.lora_name}.lora_down.weight"] = layer.lora_down.weight.detach().float().cpu().contiguous()
        sd[f"{layer.lora_name}.lora_up.weight"] = layer.lora_up.weight.detach().float().cpu().contiguous()
        sd[f"{layer.lora_name}.alpha"] = layer.lora_alpha.detach().float().cpu().reshape(())
    if not sd:
        raise ValueError("the model has no LoRA adapters to export")
    return sd


def _write(sd: Mapping[str, torch.Tensor], path: Path) -> Path:
    """``sd`` (kohya keys) as ``.safetensors`` at ``path``, atomically, with kohya's ``ss_`` metadata."""
    from ldm.training.checkpoint import atomic_save_safetensors

    first = next(k for k in sd if k.endswith(".lora_down.weight"))[: -len(".lora_down.weight")]
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(sd[first + ".lora_down.weight"].shape[0]),
            "ss_network_alpha": f"{float(sd[first + '.alpha']):g}"}
    atomic_save_safetensors(sd, Path(path), meta)
    logger.info("LoRA written: %s (%d layers)", path, len(sd) // 3)
    return Path(path)


def save_kohya(model: nn.Module, path: Path) -> Path:
    """Write the model's adapters as a kohya-format ``.safetensors`` (atomically); returns the path."""
    return _write(kohya_state_dict(model), Path(path))


def kohya_from_training_state(sd: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any]) -> dict:
    """The adapters in a training checkpoint's ``state_dict`` under kohya names (from the UNet's layout params,
    no model built); {} when it has none."""
    from ldm.convert import diffusers_keys as dk

    prefix, down = "model.diffusion_model.", ".lora_down.weight"
    layers = [k[len(prefix):-len(down)] for k in sd if k.startswith(prefix) and k.endswith(down)]
    if not layers:
        return {}
    blocks = unet_params["num_res_blocks"]
    params = {"num_res_blocks": blocks[0] if isinstance(blocks, (list, tuple)) else blocks,
              "channel_mult": list(unet_params["channel_mult"]),
              "attention_resolutions": list(unet_params["attention_resolutions"])}
    converted = dk.unet_to_diffusers({f"{n}.weight": None for n in layers}, params)  # keeps the order
    out: dict[str, torch.Tensor] = {}
    for layer, theirs in zip(layers, converted):
        name, ours = "lora_unet_" + theirs[: -len(".weight")].replace(".", "_"), prefix + layer
        out[name + ".lora_down.weight"] = sd[ours + ".lora_down.weight"].float().contiguous()
        out[name + ".lora_up.weight"] = sd[ours + ".lora_up.weight"].float().contiguous()
        out[name + ".alpha"] = sd[ours + ".lora_alpha"].float().reshape(())
    return out


def export_lora_checkpoint(ckpt: Path, out: Path, force: bool = False) -> Path:
    """The adapters of a LoRA run's training checkpoint (``last.ckpt`` / ``step-N.ckpt``) as a kohya file at ``out``;
    ValueError when it has none, FileExistsError when ``out`` exists (unless ``force``)."""
    from ldm.training.checkpoint import read_training_checkpoint

    state = read_training_checkpoint(ckpt)
    try:
        unet_params = state["config"]["model"]["params"]["unet_config"]["params"]
    except (KeyError, TypeError):
        raise ValueError(f"'{ckpt}' keeps no model config with a unet_config; is it a diffusion run's?") from None
    sd = kohya_from_training_state(state["state_dict"], unet_params)
    if not sd:
        raise ValueError(f"'{ckpt}' holds no LoRA adapters (the run had no lora: section); use --export_ema")
    if Path(out).exists() and not force:
        raise FileExistsError(f"'{out}' exists; pass --force to replace it")
    return _write(sd, Path(out))


def apply_lora_section(model: nn.Module, section: Mapping[str, Any] | None) -> Sequence[nn.Parameter]:
    """The trainer's hook: adapters per the config's ``lora:`` section."""
    return add_lora(model, lora_config(section))

"""Read a LoRA file (kohya / web-UI or diffusers / PEFT layout) into per-module low-rank factors."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ldm.checkpoint import CheckpointError, read_checkpoint

logger = logging.getLogger(__name__)

# suffix -> role; kohya / web UI (LoCon uses the same names for convolutions) and diffusers / PEFT
_ROLES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha", ".lora_mid.weight": "mid",
          ".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up"}
_OTHER_NETWORKS = ("hada_w1_a", "lokr_w1", "oft_blocks", ".diff", "dora_scale", ".w_norm")


class LoraError(CheckpointError):
    """A LoRA that cannot be found, read or used with the model; the message names the file and the fix (the
    scripts report it in one line with exit status 2, as a bad checkpoint)."""


@dataclass
class LoraModule:
    """The factors of one adapted layer: ``up`` [out, r(, 1, 1)] @ ``down`` [r, in(, kh, kw)] x alpha / r."""

    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    mid: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        """The rank r (rows of ``down``)."""
        return int(self.down.shape[0])

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The weight change ``up @ down * alpha / r`` in float32, shaped like the weight it changes."""
        up, down = self.up.float().flatten(1), self.down.float()
        if self.mid is not None:  # LoCon with a Tucker core: down [r, in, 1, 1], mid [r, r, kh, kw]
            down = torch.einsum("rskl,si->rikl", self.mid.float(), down.flatten(1))
        scale = (self.alpha / self.rank) if self.alpha is not None else 1.0
        return (up @ down.flatten(1)).reshape(shape) * scale


@dataclass
class LoraFile:
    """A LoRA file's modules by name (the file's own naming, suffixes removed)."""

    path: Path
    modules: dict[str, LoraModule] = field(default_factory=dict)


def _split(key: str) -> tuple[str, str]:
    """(module name, role) of a LoRA key; role '' when the suffix is not a LoRA factor."""
    for suffix, role in _ROLES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    if ".lora_A." in key or ".lora_B." in key:  # PEFT with an adapter name: x.lora_A.<adapter>.weight
        head, rest = key.split(".lora_A." if ".lora_A." in key else ".lora_B.", 1)
        return head, "down" if ".lora_A." in key else "up"
    return key, ""


def read_lora(path: Path) -> LoraFile:
    """Read ``path`` safely (``ldm.checkpoint``) and group its tensors by module; LoraError when it is no LoRA."""
    try:
        tensors, _ = read_checkpoint(path)
    except CheckpointError as e:
        raise LoraError(f"LoRA '{path}': {e}") from None
    other = sorted({k for k in tensors if any(m in k for m in _OTHER_NETWORKS)})
    if other:
        raise LoraError(f"LoRA '{path}' is another kind of network (LoHa / LoKr / OFT / DoRA / full diff, e.g. "
                        f"'{other[0]}'), which is not supported: only LoRA and LoCon files")
    lora = LoraFile(Path(path))
    unknown = []
    for key, value in tensors.items():
        name, role = _split(key)
        if not role:
            unknown.append(key)
            continue
        module = lora.modules.setdefault(name, LoraModule())
        setattr(module, role, float(value) if role == "alpha" else value)
    _apply_peft_alphas(lora, path)
    if unknown:
        raise LoraError(f"LoRA '{path}': {len(unknown)} key(s) are not LoRA factors (.lora_down/.lora_up/.alpha or "
                        f"lora_A/lora_B), e.g. {', '.join(unknown[:3])}: is this a LoRA file?")
    broken = [n for n, m in lora.modules.items() if m.down is None or m.up is None]
    if broken:
        raise LoraError(f"LoRA '{path}': {len(broken)} module(s) lack their down or up factor, e.g. '{broken[0]}'; "
                        f"the file is incomplete")
    return lora


def _peft_metadata(path: Path) -> dict[str, Any]:
    """The ``lora_adapter_metadata`` diffusers writes into a LoRA's safetensors header (PEFT's LoraConfig per part,
    keys ``unet.lora_alpha`` ...); {} when absent or unreadable."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        data = json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _apply_peft_alphas(lora: LoraFile, path: Path) -> None:
    """Give modules without ``.alpha`` the alpha of the file's PEFT metadata (``alpha_pattern``, else
    ``lora_alpha``; rsLoRA scales by alpha / sqrt(r)). Without metadata the scale stays 1, as diffusers loads it."""
    meta = _peft_metadata(path)
    if not meta:
        return
    for name, module in lora.modules.items():
        if module.alpha is not None:
            continue
        part = name.split(".", 1)[0]
        alpha = meta.get(f"{part}.lora_alpha")
        patterns = meta.get(f"{part}.alpha_pattern") or {}
        alpha = next((float(v) for k, v in patterns.items() if name.endswith(k)), alpha)
        if alpha is None:
            continue
        rank = module.rank
        module.alpha = float(alpha) * (math.sqrt(rank) if meta.get(f"{part}.use_rslora") else 1.0)

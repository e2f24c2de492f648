"""Merge LoRA deltas into a model's weights (no per-step cost) and restore the exact original weights later."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from ldm.modules.lora.files import LoraError, LoraFile, LoraModule, read_lora
from ldm.modules.lora.targets import TEXT, UNET, Target, lora_targets

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA file with its strengths for the UNet and the text encoder."""

    path: Path
    unet_weight: float = 1.0
    text_weight: float = 1.0

    def weight(self, part: str) -> float:
        """The strength for ``part`` (``UNET`` or ``TEXT``)."""
        return self.unet_weight if part == UNET else self.text_weight


@dataclass
class MergedLoras:
    """The LoRAs merged into a model and the original weights they changed (kept on the CPU) to undo them."""

    model: torch.nn.Module
    specs: tuple[LoraSpec, ...] = ()
    originals: dict[str, torch.Tensor] = field(default_factory=dict)

    @torch.no_grad()
    def restore(self) -> None:
        """Put the original weights back exactly; the model is as before the merge."""
        params = dict(self.model.named_parameters())
        for key, original in self.originals.items():
            params[key].copy_(original)
        self.originals.clear()
        self.specs = ()


def _match(lora: LoraFile, targets: dict[str, Target]) -> list[tuple[LoraModule, Target, str]]:
    """(module, target, name) for every module of the file; LoraError naming the modules that match nothing."""
    matched, unmatched = [], []
    for name, module in lora.modules.items():
        target = targets.get(name)
        if target is None:
            unmatched.append(name)
        else:
            matched.append((module, target, name))
    if unmatched:
        family = " (its text-encoder or UNet layout is another model family's?)" if matched else ""
        raise LoraError(f"LoRA '{lora.path.name}': {len(unmatched)} of its {len(lora.modules)} modules match nothing "
                        f"in this model{family}: {', '.join(unmatched[:4])}{' ...' if len(unmatched) > 4 else ''}")
    return matched


def _check_shape(lora: LoraFile, name: str, module: LoraModule, expected: torch.Size) -> None:
    """LoraError when the factors cannot make a delta of the weight's shape (a LoRA for another model family)."""
    out, inner = int(module.up.shape[0]), int(module.down[0].numel()) if module.mid is None else None
    want_in = int(expected[1:].numel()) if len(expected) > 1 else 1
    ok = out == expected[0] and module.up.shape[1] == module.rank and (inner is None or inner == want_in)
    if not ok:
        raise LoraError(f"LoRA '{lora.path.name}' does not fit this model: '{name}' makes a "
                        f"{out} x {inner} change but the weight is {' x '.join(map(str, expected))}. It was made for "
                        f"another model (SD 1, SD 2 or SDXL?); use a LoRA trained for this one")


def check_loras(model: torch.nn.Module, specs: Sequence[LoraSpec],
                files: Optional[dict[Path, LoraFile]] = None) -> list[tuple[float, LoraModule, Target, tuple]]:
    """Read every LoRA (cached in ``files`` by path) and check it against the model; returns the merge plan.

    LoraError when a file cannot be read, a module matches nothing, or a shape does not fit.
    """
    files = files if files is not None else {}
    targets = lora_targets(model)
    params = dict(model.named_parameters())
    plan = []
    for spec in specs:
        lora = files.get(spec.path) or read_lora(spec.path)
        files[spec.path] = lora
        for module, target, name in _match(lora, targets):
            rows = target.rows or (0, params[target.key].shape[0])
            shape = torch.Size((rows[1] - rows[0], *params[target.key].shape[1:]))
            _check_shape(lora, name, module, shape)
            plan.append((spec.weight(target.part), module, target, rows))
    return plan


@torch.no_grad()
def merge_loras(model: torch.nn.Module, specs: Sequence[LoraSpec],
                files: Optional[dict[Path, LoraFile]] = None) -> MergedLoras:
    """Add every LoRA's ``weight * up @ down * alpha / r`` to the weights it adapts; returns what undoes it.

    All files are read and checked before any weight changes, so a bad file leaves the model untouched.
    ``files`` caches parsed files by path. Several LoRAs on one weight add up.
    """
    if not specs:
        return MergedLoras(model)
    plan = check_loras(model, specs, files)
    params = dict(model.named_parameters())
    merged = MergedLoras(model, tuple(specs))
    for weight, module, target, rows in plan:
        if weight == 0.0:
            continue
        param = params[target.key]
        if target.key not in merged.originals:
            merged.originals[target.key] = param.detach().to("cpu", copy=True)
        part = param[rows[0]:rows[1]]
        delta = module.delta(part.shape).to(param.device) * weight  # summed in float32, stored in the weight's dtype
        part.copy_((part.float() + delta).to(param.dtype))
    if specs:
        logger.info("merged %s into %d weights", ", ".join(f"{s.path.name}" for s in specs), len(merged.originals))
    return merged

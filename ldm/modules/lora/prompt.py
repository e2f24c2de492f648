"""LoRAs named by the user: ``--lora PATH[:WEIGHT]`` and ``<lora:NAME:WEIGHT>`` tags in prompts (web-UI syntax),
resolved in ``models/lora/``; a session that keeps the merged set in step with the prompts of each batch."""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ldm.modules.lora.files import LoraError, LoraFile
from ldm.modules.lora.merge import LoraSpec, MergedLoras, check_loras, merge_loras

DEFAULT_LORA_DIR = Path(__file__).resolve().parents[3] / "models" / "lora"
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")
TAG = re.compile(r"<lora:([^>]*)>")


def _weights(args: Sequence[str], where: str) -> tuple[float, float]:
    """(unet, text) strengths from web-UI arguments: ``W`` (both), ``TE:UNET``, or ``te=`` / ``unet=``."""
    positional, named = [], {}
    for arg in args:
        key, sep, value = arg.partition("=")
        try:
            number = float(value if sep else arg)
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or (sep and key.strip() not in ("te", "unet")):
            raise LoraError(f"{where}: '{arg}' is not a strength (a number, or te=NUMBER / unet=NUMBER)")
        if sep:
            named[key.strip()] = number
        else:
            positional.append(number)
    if len(positional) > 2:
        raise LoraError(f"{where}: at most two strengths (text encoder, UNet), got {len(positional)}")
    text = named.get("te", positional[0] if positional else 1.0)
    unet = named.get("unet", positional[1] if len(positional) > 1 else text)
    return unet, text


def parse_lora_flag(value: str) -> LoraSpec:
    """``--lora PATH[:WEIGHT[:UNET_WEIGHT]]`` (or ``:te=W`` / ``:unet=W``); LoraError when the file is missing."""
    parts = value.split(":")
    cut = len(parts)
    while cut > 1 and re.fullmatch(r"\s*((te|unet)\s*=.*|[-+0-9.eE]+)\s*", parts[cut - 1]):
        cut -= 1
    path = Path(":".join(parts[:cut])).expanduser()
    if not path.is_file():
        raise LoraError(f"--lora: file '{path}' does not exist (or is not a file); check the path")
    unet, text = _weights(parts[cut:], f"--lora {value}")
    return LoraSpec(path, unet, text)


def find_lora(name: str, folder: Optional[Path] = None) -> Path:
    """The file of ``<lora:NAME>`` in ``folder`` (default ``models/lora/``), searched by file name without suffix."""
    folder = DEFAULT_LORA_DIR if folder is None else folder
    found = sorted(p for p in folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.stem == name
                   and p.is_file()) if folder.is_dir() else []
    if not found:
        raise LoraError(f"<lora:{name}:...> names no LoRA: no {name}.safetensors (or .pt/.ckpt/.bin) in '{folder}'. "
                        f"Put the file there, or fix the name")
    if len(found) > 1:
        raise LoraError(f"<lora:{name}:...> is ambiguous in '{folder}': {', '.join(str(p) for p in found)}; "
                        f"rename one")
    return found[0]


def prompt_loras(prompt: str, folder: Optional[Path] = None) -> tuple[LoraSpec, ...]:
    """The LoRAs a prompt's ``<lora:NAME:WEIGHT>`` tags name, in order."""
    specs = []
    for match in TAG.finditer(prompt):
        name, *args = match.group(1).split(":")
        specs.append(LoraSpec(find_lora(name.strip(), folder), *_weights(args, match.group(0))))
    return tuple(specs)


def strip_tags(prompt: str) -> str:
    """The prompt without its ``<lora:...>`` tags (as the web UI: the tag text is removed, nothing else)."""
    return TAG.sub("", prompt)


class LoraSession:
    """The LoRAs of a run: the ``--lora`` ones always, plus those each batch's prompts name; switches by undoing."""

    def __init__(self, model: torch.nn.Module, flags: Sequence[LoraSpec], prompts: Sequence[str],
                 folder: Optional[Path] = None):
        self.model, self.flags, self.folder = model, tuple(flags), folder
        self.files: dict[Path, LoraFile] = {}
        every = {s.path: s for p in prompts for s in self.specs_for(p)}  # unknown names fail here, before any image
        if self.flags or every:
            check_loras(model, [*self.flags, *every.values()], self.files)
        self.merged = merge_loras(model, self.flags, self.files) if self.flags else MergedLoras(model)

    def specs_for(self, prompt: str) -> tuple[LoraSpec, ...]:
        """``--lora`` files, then the prompt's tags."""
        return self.flags + prompt_loras(prompt, self.folder)

    def prepare(self, prompts: Sequence[str]) -> list[str]:
        """Merge the LoRAs these prompts name (undoing others); returns the prompts without their tags."""
        wanted = {self.specs_for(p) for p in prompts}
        if len(wanted) > 1:
            raise LoraError("the prompts of one batch name different <lora:...> tags, but a batch runs with one "
                            "set of weights: give such prompts their own batches (--n_samples 1)")
        specs = wanted.pop() if wanted else self.flags
        if specs != self.merged.specs:
            self.merged.restore()
            self.merged = merge_loras(self.model, specs, self.files)
        return [strip_tags(p) for p in prompts]

    def prepare_job(self, job: Any) -> Any:
        """``prepare`` for a ``pipeline.Job``: a copy whose prompts have no tags (the original keeps them verbatim)."""
        return dataclasses.replace(job, prompts=tuple(self.prepare(job.prompts)))

    def close(self) -> None:
        """Undo every merged LoRA (the model's own weights again)."""
        self.merged.restore()

"""How an image was made, as the PNG ``parameters`` text that the common Stable Diffusion web UIs write and read.

Format (last line: comma-separated ``key: value`` pairs; values with ``,`` ``:`` ``"`` or a newline are JSON-quoted)::

    a red circle on a blue background
    Negative prompt: blurry
    Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 256x256, Model hash: 0123456789, Model: sd-shapes
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Optional

from ldm import samplers
from ldm.samplers import SamplerChoice

NEGATIVE_PREFIX = "Negative prompt:"
# One "key: value" pair of the settings line; a value is a JSON string or runs up to the next comma.
_PAIR = re.compile(r'\s*([\w \-/+.()]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
HASH_LENGTH = 10  # the web UIs' short sha256 "Model hash"


@dataclass(frozen=True)
class ImageParameters:
    """Everything needed to make one image again (its own seed included)."""

    prompt: str
    negative_prompt: str
    steps: int
    sampler: str
    cfg_scale: float
    seed: int
    width: int
    height: int
    model: Optional[str] = None
    model_hash: Optional[str] = None
    denoising_strength: Optional[float] = None
    eta: Optional[float] = None  # written only when set (not the sampler's default)
    vae: Optional[str] = None
    schedule_type: Optional[str] = None  # the web UI's "Schedule type" (Karras, Exponential, Uniform)
    clip_skip: Optional[int] = None  # the web UI's "Clip skip", written when above 1

    def settings(self) -> dict[str, str]:
        """The settings line as an ordered key -> text mapping (web UI key names)."""
        items = {"Steps": str(self.steps), "Sampler": self.sampler}
        if self.schedule_type:
            items["Schedule type"] = self.schedule_type
        items.update({"CFG scale": f"{self.cfg_scale:g}", "Seed": str(self.seed),
                      "Size": f"{self.width}x{self.height}"})
        if self.model_hash:
            items["Model hash"] = self.model_hash
        if self.model:
            items["Model"] = self.model
        if self.denoising_strength is not None:
            items["Denoising strength"] = f"{self.denoising_strength:g}"
        if self.clip_skip is not None and self.clip_skip > 1:
            items["Clip skip"] = str(self.clip_skip)
        if self.eta is not None:
            items["Eta DDIM" if self.sampler == "DDIM" else "Eta"] = f"{self.eta:g}"
        if self.vae:
            items["VAE"] = self.vae
        return items


def quote(value: str) -> str:
    """``value`` as the web UIs write a setting: JSON-quoted when it holds ``,`` ``:`` ``"`` or a newline."""
    if any(ch in value for ch in ',:"\n'):
        return json.dumps(value, ensure_ascii=False)
    return value


def format_parameters(params: ImageParameters) -> str:
    """The PNG ``parameters`` text: prompt, ``Negative prompt:`` line (when set), settings line."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"{NEGATIVE_PREFIX} {params.negative_prompt}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in params.settings().items()))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """Read a ``parameters`` text back: ``{"Prompt": ..., "Negative prompt": ..., "Steps": "50", ...}``."""
    lines = text.strip("\n").split("\n")
    settings: dict[str, str] = {}
    pairs = _PAIR.findall(lines[-1]) if lines else []
    if len(pairs) >= 3:  # a settings line, not part of the prompt
        lines = lines[:-1]
        for key, value in pairs:
            settings[key.strip()] = json.loads(value) if value.startswith('"') else value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX):
            in_negative, line = True, line[len(NEGATIVE_PREFIX):].strip()
        (negative if in_negative else prompt).append(line)
    return {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative), **settings}


def sampler_of(settings: dict[str, str]) -> SamplerChoice:
    """The sampler a parameters text names: ``Sampler`` with ``Schedule type``, or the older combined form
    (``Sampler: DPM++ 2M Karras``); raises :class:`~ldm.samplers.UnknownSampler` for names not in the table."""
    schedule = settings.get("Schedule type")
    return samplers.resolve(settings["Sampler"], schedule if schedule else None)


def file_hash(path: str | os.PathLike, length: int = HASH_LENGTH) -> str:
    """Short sha256 of a file (its first ``length`` hex digits), as the web UIs' ``Model hash``."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]

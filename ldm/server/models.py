"""The checkpoints the server can switch between (``/sdapi/v1/sd-models``) and the LoRAs prompts can name."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

from ldm.inference import loading
from ldm.inference.metadata import file_hash

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


@dataclass(frozen=True)
class Checkpoint:
    """One model the server can load; ``ckpt`` None is the shipped default model."""

    name: str  # what the web UI calls model_name
    filename: Path
    ckpt: Optional[Path]
    config: Optional[Path]
    sha256: Optional[str] = None  # computed when the model is first loaded (reading a big file takes a while)

    @property
    def short_hash(self) -> Optional[str]:
        """The web UI's 10-digit ``Model hash`` (None until hashed)."""
        return self.sha256[:10] if self.sha256 else None

    @property
    def title(self) -> str:
        """``name [hash]`` (just ``name`` until hashed), the web UI's title (what ``sd_model_checkpoint`` holds)."""
        return f"{self.name} [{self.short_hash}]" if self.sha256 else self.name

    def hashed(self, weights: Optional[Path] = None) -> "Checkpoint":
        """This entry with its sha256: of ``weights`` (the file loaded: a diffusers folder's UNet) or its file."""
        return self if self.sha256 else replace(self, sha256=file_hash(weights or self.filename, 64))

    def as_json(self) -> dict[str, Any]:
        """The web UI's ``/sd-models`` entry."""
        return {"title": self.title, "model_name": self.name, "hash": self.short_hash, "sha256": self.sha256,
                "filename": str(self.filename), "config": str(self.config) if self.config else None}

    def matches(self, text: str) -> bool:
        """True when ``text`` names this checkpoint by title, name, file name or hash."""
        text = text.strip()
        return text in (self.title, self.name, self.filename.name, self.short_hash or self.name,
                        self.sha256 or self.name) or (
            Path(text).stem == Path(self.name).stem and bool(text))


def default_checkpoint(default_dir: Optional[Path] = None) -> Checkpoint:
    """The shipped default model as a catalogue entry."""
    source = loading.default_model_source(default_dir)
    return Checkpoint(source.name, source.ckpt_path, None, None)


def find_checkpoints(folders: Sequence[Path]) -> list[Checkpoint]:
    """Checkpoint files (``.safetensors``, ``.ckpt``) directly in ``folders``, with ``<name>.yaml`` beside them
    as their config when present."""
    found = []
    for folder in folders:
        if not folder.is_dir():
            logger.warning("checkpoint folder '%s' does not exist; ignored", folder)
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file():
                config = path.with_suffix(".yaml")
                found.append(Checkpoint(path.name, path, path, config if config.is_file() else None))
    return found


def find_loras(folder: Path) -> list[dict[str, Any]]:
    """The web UI's ``/loras`` entries of the LoRA files prompts can name (``<lora:NAME:WEIGHT>``)."""
    from ldm.modules.lora.prompt import LORA_SUFFIXES

    if not folder.is_dir():
        return []
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file())
    return [{"name": p.stem, "alias": p.stem, "path": str(p), "metadata": {}} for p in files]

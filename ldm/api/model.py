"""A model loaded once for many generations: weights (checkpoint, config, VAE, LoRAs), device, precision, checker."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional, Sequence

import torch

from ldm.inference import accel, loading, pipeline
from ldm.inference.errors import UsageError
from ldm.inference.metadata import file_hash
from ldm.inference.sdxl import SDXL, is_sdxl_config
from ldm.modules.lora import LoraSession

logger = logging.getLogger(__name__)

SD = "sd"  # the model kind of SD 1 / SD 2 LatentDiffusion models (conditioning + sampling: generate.sd_latents)


@dataclass
class LoadedModel:
    """A model ready to generate: the network in eval mode and everything a request needs to know about it."""

    model: torch.nn.Module
    source: loading.ModelSource
    config: Any
    geometry: loading.ModelGeometry
    device: str
    precision: pipeline.Precision
    model_hash: str
    loras: LoraSession
    checker: Any = None
    vae_name: Optional[str] = None
    kind: str = SD
    vae_path: Optional[Path] = None  # --vae (an SDXL refiner loads it too)

    @property
    def name(self) -> str:
        """The model's display name (checkpoint stem or default model folder)."""
        return self.source.name

    @property
    def inpainting(self) -> bool:
        """True for inpainting checkpoints (9 UNet input channels): they only inpaint."""
        from ldm.inference.inpaint import config_is_inpainting

        return config_is_inpainting(self.config)

    def close(self) -> None:
        """Undo merged LoRAs (the model's own weights again)."""
        self.loras.close()


def build(source: loading.ModelSource, config: Any, geometry: loading.ModelGeometry, *, device: str,
          use_ema: Optional[bool] = None, vae: Optional[Path] = None, loras: Sequence[Any] = (),
          prompts: Sequence[str] = (), precision: str = "autocast", bf16: bool = False,
          safety_check: bool = False, safety_checker: Optional[Path] = None, speed: Any = None) -> LoadedModel:
    """Load the weights of a checked source (``loading.resolve_source``/``read_config``) onto ``device``.

    ``loras``: ``LoraSpec``s merged for good; ``prompts``: checked now for ``<lora:...>`` tags; ``speed``: an object
    with the ``accel`` attributes (``tiled_vae``, ``fast``, ``compile``, ``threads``, ``bf16``, ``precision``).
    """
    model = loading.load_model(source, config, use_ema, vae, device)
    session = LoraSession(model, loras, prompts)
    for applied in accel.apply_options(model, speed if speed is not None else SimpleNamespace()):
        logger.info("speed option: %s", applied)
    checker = loading.load_checker(safety_checker, device) if safety_check else None
    return LoadedModel(model=model, source=source, config=config, geometry=geometry, device=device,
                       precision=pipeline.choose_precision(device, precision, bf16),
                       model_hash=file_hash(source.ckpt_path), loras=session, checker=checker,
                       vae_name=vae.stem if vae is not None else None, vae_path=vae,
                       kind=SDXL if is_sdxl_config(config) else SD)


def load(ckpt: Optional[str | Path] = None, config: Optional[str | Path] = None, *, vae: Optional[str | Path] = None,
         loras: Sequence[str] = (), device: Optional[str] = None, precision: str = "autocast", bf16: bool = False,
         use_ema: Optional[bool] = None, safety_check: bool = False, safety_checker: Optional[str | Path] = None,
         unsafe_config: bool = False, default_dir: Optional[Path] = None) -> LoadedModel:
    """Load a model once: ``ckpt`` (file or diffusers folder; None: the shipped default model), its ``config``
    (None: beside it or inferred), an external ``vae``, ``loras`` as ``PATH[:WEIGHT]``, ``device`` (None: cuda when
    present), ``precision`` (``autocast`` or ``full``) and, with ``safety_check``, the NSFW checker from
    ``safety_checker`` (None: ``models/safety_checker`` when there). Bad input raises ``UsageError`` or
    ``CheckpointError``."""
    from ldm.inference.args import resolve_device
    from ldm.modules.lora import parse_lora_flag

    if config is not None and ckpt is None:
        raise UsageError("a config was given without a checkpoint: pass the weights that go with it")
    for what, path in (("checkpoint", ckpt), ("config", config), ("VAE", vae)):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{what} '{path}' does not exist; check the path")
    device = resolve_device(device)
    source = loading.resolve_source(Path(ckpt) if ckpt else None, Path(config) if config else None, default_dir)
    cfg = loading.read_config(source.config_path, allow_unsafe=unsafe_config)
    geometry = loading.model_geometry(cfg, source.config_path)
    specs = [parse_lora_flag(str(spec)) for spec in loras]
    return build(source, cfg, geometry, device=device, use_ema=use_ema, vae=Path(vae) if vae else None, loras=specs,
                 precision=precision, bf16=bf16, safety_check=safety_check,
                 safety_checker=Path(safety_checker) if safety_checker is not None else None,
                 speed=SimpleNamespace(precision=precision, bf16=bf16))

"""A tiny random-weight Stable Diffusion 1-style model (config + safetensors checkpoint) for fast CPU tests.

32 x 32 pixel images (16 x 16 latents, factor 2), a 2-layer CLIP text encoder of width 32 in the SD 1 (Hugging Face)
layout, a 2-level UNet with cross-attention. Built in a few hundred milliseconds; generation takes well under a
second per image on a CPU.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

FACTOR = 2
LATENT = 16
PIXELS = LATENT * FACTOR
CHANNELS = 4

TEXT_CONFIG = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
               "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
               "layer_norm_eps": 1e-5, "model_type": "clip_text_model"}


def tiny_config(text_dir: Path) -> dict[str, Any]:
    """The ``model:`` config of the tiny model; the text encoder's architecture is read from ``text_dir``."""
    return {"model": {
        "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
        "params": {
            "linear_start": 0.00085, "linear_end": 0.012, "num_timesteps_cond": 1, "log_every_t": 200,
            "timesteps": 1000, "first_stage_key": "jpg", "cond_stage_key": "txt", "image_size": LATENT,
            "channels": CHANNELS, "cond_stage_trainable": False, "conditioning_key": "crossattn",
            "monitor": "val/loss_simple_ema", "scale_factor": 0.18215, "use_ema": False,
            "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
                "image_size": LATENT, "in_channels": CHANNELS, "out_channels": CHANNELS, "model_channels": 32,
                "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
                "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32,
                "use_checkpoint": False, "legacy": False}},
            "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
                "embed_dim": CHANNELS, "monitor": "val/rec_loss",
                "ddconfig": {"double_z": True, "z_channels": CHANNELS, "resolution": PIXELS, "in_channels": 3,
                             "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                             "attn_resolutions": [], "dropout": 0.0},
                "lossconfig": {"target": "torch.nn.Identity"}}},
            "cond_stage_config": {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                  "params": {"version": str(text_dir), "max_length": 77}},
        }}}


def write_tiny_model(folder: Path, seed: int = 0, name: str = "tiny") -> tuple[Path, Path]:
    """Write ``<name>.yaml`` and ``<name>.safetensors`` (random weights, seeded) into ``folder``; returns both."""
    from ldm.checkpoint import save_safetensors
    from ldm.util import instantiate_from_config

    folder.mkdir(parents=True, exist_ok=True)
    text_dir = folder / f"{name}-text"
    text_dir.mkdir(exist_ok=True)
    (text_dir / "config.json").write_text(json.dumps(TEXT_CONFIG), encoding="utf-8")
    config = OmegaConf.create(tiny_config(text_dir))
    config_path = folder / f"{name}.yaml"
    OmegaConf.save(config, config_path)
    torch.manual_seed(seed)
    model = instantiate_from_config(config.model)
    with torch.no_grad():  # the UNet's zero-initialised output layers would make every sample the start noise
        for param in model.model.parameters():
            if param.dim() > 1 and not param.abs().sum():
                param.normal_(0.0, 0.02)
    ckpt_path = folder / f"{name}.safetensors"
    save_safetensors(model.state_dict(), ckpt_path)
    return config_path, ckpt_path


# Helpers shared by the script tests.

def load_script(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module (its ``main(argv)`` runs in-process)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def model_args(tiny: tuple[Path, Path], steps: int = 2) -> list[str]:
    """Flags selecting the tiny model (``--config``, ``--ckpt``), no safety checker, few steps."""
    config, ckpt = tiny
    return ["--config", str(config), "--ckpt", str(ckpt), "--no_safety_check", "--ddim_steps", str(steps)]


def pixels(path: Path) -> np.ndarray:
    """RGB pixels [H, W, 3] uint8 of an image file."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def samples(outdir: Path) -> list[Path]:
    """The images a run wrote into ``outdir/samples``, sorted by name."""
    return sorted((outdir / "samples").glob("*.png"))


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to the float rounding that differs between batch sizes (kernels may sum in another order)."""
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2

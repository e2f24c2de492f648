"""Tell which Stable Diffusion family a state_dict belongs to, from its keys and shapes alone."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "stable-diffusion"
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "ldm" / "sd-shapes"
SD_UNET_CHANNELS = 320  # model_channels of every SD 1.x / 2.x UNet

UNET_IN = "model.diffusion_model.input_blocks.0.0.weight"
SD1_TEXT = "cond_stage_model.transformer.text_model."
SD2_TEXT = "cond_stage_model.model.transformer.resblocks."
SDXL_CONFIG_DIR = CONFIG_DIR.parent / "sdxl"
SDXL_CLIP_L = "conditioner.embedders.0.transformer.text_model."  # base: CLIP ViT-L (HF layout), then OpenCLIP bigG
SDXL_BASE_BIGG = "conditioner.embedders.1.model.transformer.resblocks."
SDXL_REFINER_BIGG = "conditioner.embedders.0.model.transformer.resblocks."  # refiner: OpenCLIP bigG alone


@dataclass(frozen=True)
class Family:
    """A model family: a name, the inference config that builds it, and what had to be assumed."""

    name: str
    config: Path | None
    assumption: str = ""


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    v = sd.get(key)
    return tuple(v.shape) if v is not None and hasattr(v, "shape") else None


def _default_model_layout(model_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.")}


def matches_default_model(sd: Mapping[str, Any], model_dir: Path = DEFAULT_MODEL_DIR) -> bool:
    """True when ``sd`` has exactly the UNet keys and shapes of the embedded default model (e.g. a fine-tune of it)."""
    if not (model_dir / "model.safetensors").is_file():
        return False
    unet = {k: _shape(sd, k) for k in sd if k.startswith("model.")}
    return unet == _default_model_layout(model_dir)


def detect_family(sd: Mapping[str, Any], filename: str = "") -> Family:
    """Family of a full SD checkpoint's state_dict; raises ValueError when it is not one we can build."""
    unet_in = _shape(sd, UNET_IN)
    if unet_in is None:
        raise ValueError(f"no '{UNET_IN}' key: this is not a full Stable Diffusion checkpoint (a VAE or a LoRA "
                         f"file?). Pass a full model checkpoint, or a VAE with --vae.")
    sdxl = _sdxl_family(sd, unet_in)
    if sdxl is not None:
        return sdxl
    if unet_in[1] == 9:
        return _inpainting_family(sd)
    if unet_in[0] != SD_UNET_CHANNELS and matches_default_model(sd):
        return Family("sd-shapes", DEFAULT_MODEL_DIR / "config.yaml")
    if any(k.startswith(SD1_TEXT) for k in sd):
        return Family("sd1", CONFIG_DIR / "v1-inference.yaml")
    if any(k.startswith(SD2_TEXT) for k in sd):
        low = Path(filename).name.lower()
        if "base" in low or "512" in low:
            return Family("sd2", CONFIG_DIR / "v2-inference.yaml",
                          "assumed an SD 2.x base model (eps-prediction, 512 px) from the file name; for a "
                          "v-prediction model pass --config configs/stable-diffusion/v2-inference-v.yaml")
        return Family("sd2-v", CONFIG_DIR / "v2-inference-v.yaml",
                      "assumed an SD 2.x v-prediction model (768 px): eps vs v cannot be told from the weights; "
                      "for a base/eps model pass --config configs/stable-diffusion/v2-inference.yaml")
    raise ValueError("unknown text encoder layout (neither SD 1 CLIP nor SD 2 OpenCLIP keys): pass --config")


def _sdxl_family(sd: Mapping[str, Any], unet_in: tuple[int, ...]) -> Family | None:
    """SDXL base (CLIP-L + OpenCLIP-bigG conditioner) or refiner (bigG alone) by their text-encoder keys; None when
    the file has no SDXL conditioner."""
    base = any(k.startswith(SDXL_BASE_BIGG) for k in sd) and any(k.startswith(SDXL_CLIP_L) for k in sd)
    refiner = not base and any(k.startswith(SDXL_REFINER_BIGG) for k in sd)
    if not (base or refiner):
        return None
    if unet_in[1] != 4:
        raise ValueError(f"an SDXL checkpoint whose UNet takes {unet_in[1]} input channels (inpainting?) is not "
                         f"supported: only the SDXL base and refiner layouts")
    if base:
        return Family("sdxl", SDXL_CONFIG_DIR / "sd_xl_base.yaml")
    return Family("sdxl-refiner", SDXL_CONFIG_DIR / "sd_xl_refiner.yaml")


def _inpainting_family(sd: Mapping[str, Any]) -> Family:
    """SD 1.5 or SD 2 inpainting (9 UNet input channels: latent, mask, masked-image latent), by the text encoder."""
    if any(k.startswith(SD1_TEXT) for k in sd):
        return Family("sd1-inpainting", CONFIG_DIR / "v1-inpainting-inference.yaml")
    if any(k.startswith(SD2_TEXT) for k in sd):
        return Family("sd2-inpainting", CONFIG_DIR / "v2-inpainting-inference.yaml")
    raise ValueError("an inpainting checkpoint (9 UNet input channels) with an unknown text encoder layout "
                     "(neither SD 1 CLIP nor SD 2 OpenCLIP keys): pass --config")


def describe_mismatch_hint(sd: Mapping[str, Any], model_sd: Mapping[str, Any]) -> str:
    """One-line hint naming the config that would fit ``sd`` better than the model's, or ''."""
    try:
        fam = detect_family(sd)
    except ValueError:
        if _shape(sd, UNET_IN) is None and any(k.startswith("encoder.") for k in sd):
            return "this looks like a standalone autoencoder (VAE) file: load it with --vae"
        return ""
    try:
        mine = detect_family(model_sd)
    except ValueError:
        mine = None
    if fam.name.endswith("-inpainting") and (mine is None or mine.name != fam.name):
        return f"this looks like an inpainting checkpoint: use configs/stable-diffusion/{fam.config.name}"
    if mine is not None and mine.name.startswith(fam.name[:3]):
        return ""
    if fam.name.startswith("sdxl"):
        kind = "an SDXL refiner" if fam.name == "sdxl-refiner" else "an SDXL base"
        return f"this looks like {kind} checkpoint: use configs/sdxl/{fam.config.name}"
    if fam.name == "sd1":
        return "this looks like an SD 1.x checkpoint: use configs/stable-diffusion/v1-inference.yaml"
    return ("this looks like an SD 2.x checkpoint: use configs/stable-diffusion/v2-inference-v.yaml for the "
            "v-prediction (768 px) models or v2-inference.yaml for the eps (512 px base) models")

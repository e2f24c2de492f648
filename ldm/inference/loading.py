"""Which model to run and how to load it: the embedded default, ``<ckpt>.yaml`` beside a checkpoint, or a config
inferred from the checkpoint's keys and shapes; optional external VAE; name and hash for the metadata."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ldm.checkpoint import CheckpointError, drop_training_ema, load_weights, read_checkpoint
from ldm.inference.errors import UsageError
from ldm.model_family import DEFAULT_MODEL_DIR

logger = logging.getLogger(__name__)

# The model the scripts use when neither --ckpt nor --config is given (shipped with the project): DEFAULT_MODEL_DIR.
DEFAULT_CONFIG_NAME = "config.yaml"
DEFAULT_WEIGHTS_NAME = "model.safetensors"
DEFAULT_MODEL_PROMPT = "a red circle on a blue background"  # suits the default model
ORIGINAL_DEFAULT_PROMPT = "a painting of a virus monster playing guitar"  # the original scripts' default


@dataclass
class ModelSource:
    """Where the model comes from: config file, checkpoint, a display name; the state_dict if already read."""

    config_path: Path
    ckpt_path: Path
    name: str
    is_default: bool = False
    state_dict: Optional[dict[str, torch.Tensor]] = None


@dataclass(frozen=True)
class ModelGeometry:
    """What the config says about image sizes: latent channels, downsampling factor, native latent size."""

    channels: int
    factor: int
    latent_size: int
    timesteps: int
    text_encoder: str

    @property
    def native_pixels(self) -> int:
        """The image side the model was trained at (latent size x factor)."""
        return self.latent_size * self.factor


def default_model_source(model_dir: Optional[Path] = None) -> ModelSource:
    """The embedded default model; UsageError saying what to pass when its files are missing."""
    model_dir = model_dir or DEFAULT_MODEL_DIR
    config, weights = model_dir / DEFAULT_CONFIG_NAME, model_dir / DEFAULT_WEIGHTS_NAME
    missing = [str(p) for p in (config, weights) if not p.is_file()]
    if missing:
        raise UsageError(f"the default model is missing ({', '.join(missing)} not found). Pass a Stable Diffusion "
                         f"checkpoint with --ckpt PATH (its config is inferred; add --config PATH to choose it), "
                         f"or put the default model's files back (they ship with the project)")
    return ModelSource(config, weights, model_dir.name, is_default=True)


def _keys_and_shapes(path: Path) -> tuple[dict[str, torch.Tensor], Optional[dict[str, torch.Tensor]]]:
    """(key -> tensor with the stored shape, full state_dict or None); safetensors headers are read alone."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            return shapes, None
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read safetensors file '{path}': {e}. The file may be truncated.") from None
    state_dict, _ = read_checkpoint(path)
    return state_dict, state_dict


def infer_config(ckpt: Path) -> tuple[Path, Optional[dict[str, torch.Tensor]]]:
    """Config for a checkpoint given without --config: ``<ckpt>.yaml`` beside it, else the family of its keys."""
    sidecar = ckpt.with_suffix(".yaml")
    if sidecar.is_file():
        logger.info("config: using %s, found beside the checkpoint (its targets are checked before use; "
                    "--config PATH chooses another)", sidecar)
        return sidecar, None
    from ldm.model_family import detect_family

    shapes, state_dict = _keys_and_shapes(ckpt)
    try:
        family = detect_family(shapes, ckpt.name)
    except ValueError as e:
        raise UsageError(f"cannot infer the config of '{ckpt}': {e}") from None
    logger.info("'%s' looks like a %s checkpoint: using %s", ckpt.name, family.name, family.config)
    if family.assumption:
        logger.warning("%s", family.assumption)
    return Path(family.config), state_dict


def resolve_source(ckpt: Optional[Path], config: Optional[Path],
                   default_dir: Optional[Path] = None) -> ModelSource:
    """Model source from --ckpt/--config (both optional; a config alone is refused by argument validation)."""
    if ckpt is None:
        return default_model_source(default_dir)
    if ckpt.is_dir():
        return diffusers_source(ckpt, config)
    state_dict = None
    if config is None:
        config, state_dict = infer_config(ckpt)
    return ModelSource(config, ckpt, ckpt.stem, state_dict=state_dict)


def diffusers_source(folder: Path, config: Optional[Path]) -> ModelSource:
    """A diffusers model folder as a source: its weights converted to our layout; the config is ``config``, else
    ``<folder>.yaml`` beside it, else the family of its keys (eps or v from its scheduler config)."""
    from ldm.convert.diffusers_folder import family_config, is_diffusers_folder, read_diffusers_folder, sidecar_config

    if not is_diffusers_folder(folder):
        raise UsageError(f"--ckpt '{folder}' is a folder without model_index.json: pass a checkpoint file, or a "
                         f"diffusers model folder")
    model = read_diffusers_folder(folder)
    if config is None:
        config = sidecar_config(folder) or family_config(model, folder)
        logger.info("diffusers folder '%s': using config %s", folder.name, config)
    return ModelSource(config, model.unet_file, folder.name, state_dict=model.state_dict)


def read_config(path: Path, allow_unsafe: bool = False) -> Any:
    """The OmegaConf config at ``path`` with a ``model:`` section holding a ``target:``; UsageError otherwise.

    Every ``target`` in the file must pass ``ldm.config_policy`` (checked before anything is imported or built)
    unless ``allow_unsafe`` (the user's ``--unsafe_config``)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        config = OmegaConf.load(path)
    except (OSError, OmegaConfBaseException, ValueError) as e:
        raise UsageError(f"cannot read config '{path}': {_one_line(e)}") from None
    except Exception as e:  # yaml.YAMLError, RecursionError (nested too deeply) and friends
        raise UsageError(f"config '{path}' is not valid YAML: {_one_line(e)}") from None
    model = config.get("model") if isinstance(config, Mapping) else None
    if not isinstance(model, Mapping) or "target" not in model:
        raise UsageError(f"config '{path}' has no 'model:' section with a 'target:'; pass a model config such as "
                         f"configs/stable-diffusion/v1-inference.yaml")
    _apply_policy(config, path, allow_unsafe)
    return config


def _one_line(error: BaseException, limit: int = 300) -> str:
    """``error``'s message on one line, cut to ``limit`` characters (YAML errors span lines and quote keys)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _apply_policy(config: Any, path: Path, allow_unsafe: bool) -> None:
    """UsageError when ``config`` names a target outside ``ldm.config_policy``; with ``allow_unsafe``, a warning."""
    from ldm import config_policy

    if allow_unsafe:
        outside = config_policy.outside_policy(config)
        if outside:
            logger.warning("%s: config '%s' builds targets outside this project's classes, which can run any "
                           "code: %s", config_policy.OPT_IN_FLAG, path, ", ".join(outside))
        return
    try:
        config_policy.check_config(config, str(path))
    except config_policy.UnsafeConfigError as e:
        raise UsageError(str(e)) from None


def model_geometry(config: Any, path: Path) -> ModelGeometry:
    """Latent channels, factor, native latent size and timesteps of a LatentDiffusion (or SDXL) config."""
    from ldm.inference import sdxl

    if sdxl.is_sdxl_config(config):
        return sdxl.geometry(config, path)
    params = config.model.get("params") or {}
    try:
        ddconfig = params["first_stage_config"]["params"]["ddconfig"]
        factor = 2 ** (len(ddconfig["ch_mult"]) - 1)
    except (KeyError, TypeError):
        raise UsageError(f"config '{path}' does not describe a latent diffusion model (no first_stage_config with "
                         f"a ddconfig.ch_mult); txt2img/img2img need one") from None
    text = str((params.get("cond_stage_config") or {}).get("target", ""))
    return ModelGeometry(channels=int(params.get("channels", 3)), factor=factor,
                         latent_size=int(params.get("image_size", 64)), timesteps=int(params.get("timesteps", 1000)),
                         text_encoder=text.rsplit(".", 1)[-1])


def build_model(config: Any, path: Path) -> torch.nn.Module:
    """Instantiate the ``model:`` section of ``config`` with unset weights, for a strict load to fill (no time
    spent on random initialisation); UsageError if it cannot be built."""
    from ldm.util import instantiate_from_config
    from ldm.weight_init import skipped_weight_init

    try:
        with skipped_weight_init():
            return instantiate_from_config(config.model)
    except (ImportError, KeyError, TypeError, ValueError, FileNotFoundError) as e:
        raise UsageError(f"cannot build the model described by '{path}': {e}") from None


def load_vae(model: torch.nn.Module, path: Path) -> None:
    """Replace ``model.first_stage_model``'s weights by a standalone autoencoder file (``--vae``)."""
    state_dict, _ = read_checkpoint(path)
    if any(k.startswith("model.diffusion_model.") for k in state_dict):
        raise UsageError(f"--vae '{path}' is a full model checkpoint, not an autoencoder: pass it with --ckpt")
    prefix = "first_stage_model."
    if any(k.startswith(prefix) for k in state_dict):
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    # Training leftovers of released VAE files (LPIPS/discriminator, EMA copies) are not part of the model.
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("loss.", "model_ema."))}
    load_weights(model.first_stage_model, state_dict, source=f"VAE '{path.name}'", use_ema=False)
    logger.info("using the autoencoder weights of %s", path)


def load_model(source: ModelSource, config: Any, use_ema: Optional[bool], vae: Optional[Path],
               device: str) -> torch.nn.Module:
    """Build the model of ``config``, load the checkpoint (and VAE) strictly, move it to ``device``; eval mode."""
    model = build_model(config, source.config_path)
    drop_training_ema(model)  # a training config's use_ema: true; the checkpoint's weights are chosen below
    state_dict = source.state_dict
    if state_dict is None:
        state_dict, _ = read_checkpoint(source.ckpt_path)
    report = load_weights(model, state_dict, use_ema=use_ema, source=f"checkpoint '{source.ckpt_path.name}'")
    name = source.ckpt_path.name
    if report.had_both:
        logger.info("'%s' holds raw and EMA weights: using the %s", name, "EMA weights (--no_ema for the raw "
                    "ones)" if report.used_ema else "raw (non-EMA) weights (--use_ema for the EMA ones)")
    elif use_ema is not None:
        logger.warning("'%s' holds one set of weights: --%s has nothing to choose from, using the weights it has",
                       name, "use_ema" if use_ema else "no_ema")
    source.state_dict = None
    del state_dict
    if vae is not None:
        load_vae(model, vae)
    return model.to(device).eval().requires_grad_(False)


def default_watermark(geometry: ModelGeometry) -> Any:
    """The original scripts' payload: ``SDV2`` for OpenCLIP (SD 2) models, the 48 bits of sgm for SDXL, else
    ``StableDiffusionV1``."""
    from ldm.modules.watermark import WATERMARK_SDXL, WATERMARK_V1, WATERMARK_V2

    if geometry.text_encoder == "GeneralConditioner":
        return WATERMARK_SDXL
    return WATERMARK_V2 if geometry.text_encoder == "FrozenOpenCLIPEmbedder" else WATERMARK_V1


DEFAULT_SAFETY_DIR = Path(__file__).resolve().parents[2] / "models" / "safety_checker"


def load_checker(folder: Optional[Path], device: str) -> Any:
    """The NSFW checker from ``folder`` (--safety_checker: must be complete), else from the default folder (None
    with one warning when absent)."""
    from ldm.modules.safety import SafetyChecker, find_weights, load_safety_checker

    if folder is None:
        checker = load_safety_checker(DEFAULT_SAFETY_DIR)
        return checker.to(device) if checker is not None else None
    weights = find_weights(folder)
    missing = [n for n in ("config.json", "preprocessor_config.json") if not (folder / n).is_file()]
    if weights is None:
        missing.insert(0, "model.safetensors (or pytorch_model.bin)")
    if missing:
        raise UsageError(f"--safety_checker '{folder}' lacks {', '.join(missing)}; put the safety checker files "
                         f"there, or pass --no_safety_check")
    try:
        checker = SafetyChecker.from_files(folder / "config.json", weights, folder / "preprocessor_config.json")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise UsageError(f"--safety_checker '{folder}': cannot load the checker: {e}") from None
    return checker.to(device)

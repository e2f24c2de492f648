"""Write a loaded model of ours as a diffusers folder (``StableDiffusionPipeline`` layout), all files at once."""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.checkpoint import save_safetensors
from ldm.convert import diffusers_keys as dk
from ldm.convert import diffusers_text as dt
from ldm.convert.diffusers_folder import INDEX

logger = logging.getLogger(__name__)

DIFFUSERS_VERSION = "0.42.1"  # the version the written configs were checked against


def _part(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``sd`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _text_options(embedder: torch.nn.Module, open_clip: bool) -> dict[str, Any]:
    """``text_config`` arguments: attention heads, activation, and (OpenCLIP) how many blocks the output uses."""
    if not open_clip:
        cfg = embedder.transformer.config
        return {"heads": int(cfg.num_attention_heads), "hidden_act": cfg.hidden_act, "eps": float(cfg.layer_norm_eps)}
    blocks = embedder.model.transformer.resblocks
    return {"heads": int(blocks[0].attn.num_heads), "keep_blocks": len(blocks) - int(getattr(embedder, "layer_idx", 0))}


def _scheduler_config(params: Mapping[str, Any]) -> dict[str, Any]:
    """A ``PNDMScheduler`` config with this model's training schedule and prediction type."""
    schedule = params.get("beta_schedule", "linear")
    if schedule != "linear":
        raise ValueError(f"beta_schedule '{schedule}' has no diffusers equivalent here (SD's 'linear' is "
                         f"diffusers' 'scaled_linear')")
    return {"_class_name": "PNDMScheduler", "_diffusers_version": DIFFUSERS_VERSION,
            "beta_start": float(params.get("linear_start", 0.00085)),
            "beta_end": float(params.get("linear_end", 0.012)), "beta_schedule": "scaled_linear",
            "num_train_timesteps": int(params.get("timesteps", 1000)),
            "prediction_type": "v_prediction" if params.get("parameterization", "eps") == "v" else "epsilon",
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False}


def _write_tokenizer(folder: Path, open_clip: bool, max_length: int) -> None:
    """CLIP BPE vocabulary (open_clip's bundled one, which is CLIP's) in transformers' ``CLIPTokenizer`` files."""
    from open_clip.tokenizer import SimpleTokenizer

    tok = SimpleTokenizer()
    specials = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {specials.get(k, k): int(v) for k, v in tok.encoder.items()}
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for (a, b), _ in merges) + "\n",
                                       encoding="utf-8")
    _write_json(folder / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "do_lower_case": True,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "pad_token": "!" if open_clip else "<|endoftext|>"})


def write_folder_contents(model: torch.nn.Module, config: Any, folder: Path) -> None:
    """Write ``model`` (a loaded LatentDiffusion) and its ``config`` as diffusers components into ``folder``."""
    params = config.model.params
    sd = model.state_dict()
    unet_params, first_stage = params.unet_config.params, params.first_stage_config.params
    _write_json(folder / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                  "_diffusers_version": DIFFUSERS_VERSION,
                                                  **dk.unet_config(unet_params)})
    save_safetensors(dk.unet_to_diffusers(_part(sd, dk.UNET_PREFIX), unet_params),
                     folder / "unet" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    _write_json(folder / "vae" / "config.json", {"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
                                                 "scaling_factor": float(params.get("scale_factor", 1.0)),
                                                 **dk.vae_config(first_stage)})
    vae = {k: v for k, v in _part(sd, dk.VAE_PREFIX).items() if not k.startswith("loss.")}  # training-only
    save_safetensors(dk.vae_to_diffusers(vae, first_stage.ddconfig),
                     folder / "vae" / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    text = _part(sd, dk.TEXT_PREFIX)
    open_clip = dt.is_open_clip(text)
    options = _text_options(model.cond_stage_model, open_clip)
    _write_json(folder / "text_encoder" / "config.json", dt.text_config(text, **options))
    save_safetensors(dt.text_to_diffusers(text, options.get("keep_blocks")), folder / "text_encoder" / "model.safetensors",
                     {"format": "pt"})
    _write_tokenizer(folder / "tokenizer", open_clip, int(getattr(model.cond_stage_model, "max_length", 77)))
    _write_json(folder / "scheduler" / "scheduler_config.json", _scheduler_config(params))
    _write_json(folder / INDEX, {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False})


def write_diffusers_folder(model: torch.nn.Module, config: Any, out: Path, replace: bool = False) -> None:
    """Write the folder beside ``out`` under a temporary name, then move it into place (never half-written).

    An existing ``out`` is replaced only with ``replace`` and only when it is a diffusers folder or empty.
    """
    out = out.expanduser()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # exclusively ours (fails if the name exists), with the user's umask unlike mkdtemp's 0700
    old = None
    try:
        write_folder_contents(model, config, tmp)
        if out.exists() and replace:
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists():
            os.rename(old, out)
        raise
    if old is not None:
        shutil.rmtree(old)

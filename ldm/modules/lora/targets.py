"""Which of our parameters a LoRA module name addresses, under every naming in use.

UNet: diffusers module names (kohya ``lora_unet_down_blocks_0_..``, PEFT ``unet.down_blocks.0...``) and the
original SD names (``lora_unet_input_blocks_1_1_...``, also kohya's SDXL naming). Text encoder: transformers' CLIP
names (kohya ``lora_te_``, PEFT ``text_encoder.``), for SD 1 directly and for SD 2 onto the OpenCLIP tower (q/k/v
are row blocks of ``in_proj_weight``); SDXL: ``lora_te1_`` / ``text_encoder.`` for CLIP-L, ``lora_te2_`` /
``text_encoder_2.`` for OpenCLIP-bigG.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ldm.convert import diffusers_keys as dk
from ldm.convert import diffusers_text as dt

UNET, TEXT = "unet", "text encoder"


@dataclass(frozen=True)
class Target:
    """A weight the LoRA changes: our state-dict key, the rows it covers (q/k/v of a packed matrix), its part."""

    key: str
    part: str
    rows: Optional[tuple[int, int]] = None


def _unet_params(unet: torch.nn.Module) -> dict:
    """The UNet's layout parameters the key converter needs."""
    blocks = unet.num_res_blocks
    return {"num_res_blocks": blocks[0] if isinstance(blocks, (list, tuple)) else blocks,
            "channel_mult": list(unet.channel_mult), "attention_resolutions": list(unet.attention_resolutions)}


def _layers(module: torch.nn.Module) -> list[str]:
    """Names of the Linear / Conv2d layers of ``module`` (what LoRA adapts)."""
    return [n for n, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


_NO_DIFFUSERS_NAME = ("label_emb.",)  # SDXL's size/pooled embedding MLP: only its original name is an alias


def _unet_targets(model: torch.nn.Module) -> dict[str, Target]:
    unet = model.model.diffusion_model
    layers = _layers(unet)
    table: dict[str, Target] = {}
    for name in layers:
        table["lora_unet_" + name.replace(".", "_")] = Target(f"{dk.UNET_PREFIX}{name}.weight", UNET)
    named = [n for n in layers if not n.startswith(_NO_DIFFUSERS_NAME)]
    converted = dk.unet_to_diffusers({f"{n}.weight": None for n in named}, _unet_params(unet))  # keeps the order
    for name, theirs in zip(named, converted):
        target, diffusers_name = Target(f"{dk.UNET_PREFIX}{name}.weight", UNET), theirs[:-len(".weight")]
        for alias in ("lora_unet_" + diffusers_name.replace(".", "_"), "unet." + diffusers_name):
            table[alias] = target
    return table


def _text_encoders(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, tuple[str, str]]]:
    """(state-dict prefix, encoder, (kohya prefix, diffusers prefix)) of each text encoder: SD 1/2's
    ``cond_stage_model`` (``lora_te_``), SDXL's CLIP-L (``lora_te1_``, ``text_encoder.``) and OpenCLIP-bigG
    (``lora_te2_``, ``text_encoder_2.``) embedders of the conditioner."""
    conditioner = getattr(model, "conditioner", None)
    if conditioner is None:
        return [(dk.TEXT_PREFIX, model.cond_stage_model, ("lora_te_", "text_encoder."))]
    found = []
    for i, embedder in enumerate(conditioner.embedders):
        names = {n for n, _ in embedder.named_parameters()}
        if dt.is_open_clip(names):
            found.append((f"conditioner.embedders.{i}.", embedder, ("lora_te2_", "text_encoder_2.")))
        elif any(n.startswith(dt.HF_CLIP) for n in names):
            found.append((f"conditioner.embedders.{i}.", embedder, ("lora_te1_", "text_encoder.")))
    return found


def _text_targets(model: torch.nn.Module) -> dict[str, Target]:
    table: dict[str, Target] = {}
    for prefix, encoder, (kohya, diffusers) in _text_encoders(model):
        names = {f"{n}.weight" for n in _layers(encoder)}
        if dt.is_open_clip(names):
            hf = _open_clip_aliases(encoder, prefix)
        else:
            hf = {k[len(dt.HF_CLIP):-len(".weight")]: Target(prefix + k, TEXT) for k in names
                  if k.startswith(dt.HF_CLIP)}
        for name, target in hf.items():
            table[kohya + name.replace(".", "_")] = target
            table[diffusers + name] = target
    return table


def _open_clip_aliases(encoder: torch.nn.Module, prefix: str = dk.TEXT_PREFIX) -> dict[str, Target]:
    """transformers CLIP module names -> OpenCLIP weights (row blocks of the packed q/k/v matrix)."""
    out: dict[str, Target] = {}
    blocks = encoder.model.transformer.resblocks
    for i, block in enumerate(blocks):
        width = block.attn.in_proj_weight.shape[1]
        base = f"{prefix}{dt.OPEN_CLIP}transformer.resblocks.{i}."
        hf = f"text_model.encoder.layers.{i}."
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            out[hf + "self_attn." + proj] = Target(base + "attn.in_proj_weight", TEXT, (j * width, (j + 1) * width))
        out[hf + "self_attn.out_proj"] = Target(base + "attn.out_proj.weight", TEXT)
        out[hf + "mlp.fc1"] = Target(base + "mlp.c_fc.weight", TEXT)
        out[hf + "mlp.fc2"] = Target(base + "mlp.c_proj.weight", TEXT)
    return out


def lora_targets(model: torch.nn.Module) -> dict[str, Target]:
    """Every LoRA module name this model answers to (kohya, PEFT, original SD names) -> the weight it changes."""
    return {**_unet_targets(model), **_text_targets(model)}

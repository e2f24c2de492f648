"""Text-encoder key conversion between our ``cond_stage_model.*`` layouts and diffusers' ``text_encoder/`` folder.

diffusers stores both SD 1 and SD 2 text encoders in transformers' ``CLIPTextModel`` layout (``text_model.*``).
Ours: SD 1 keeps that layout under ``transformer.``; SD 2 keeps the OpenCLIP text tower under ``model.``, whose
attention packs q, k, v into one ``in_proj`` matrix. diffusers' SD 2 folders hold one block fewer than the OpenCLIP
tower (SD 2 reads the penultimate block), and no ``text_projection`` / ``logit_scale``, which SD 2 never uses.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

OPEN_CLIP = "model."
HF_CLIP = "transformer."
_OPEN_BLOCK = "transformer.resblocks."
_HF_BLOCK = "text_model.encoder.layers."
_BLOCK_RENAMES = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                  ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
_TOP_RENAMES = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                "positional_embedding": "text_model.embeddings.position_embedding.weight",
                "ln_final.weight": "text_model.final_layer_norm.weight",
                "ln_final.bias": "text_model.final_layer_norm.bias"}
_UNUSED_SD2 = ("text_projection", "logit_scale")


def is_open_clip(sd: Mapping[str, Any]) -> bool:
    """Whether a ``cond_stage_model``-local state dict is the SD 2 OpenCLIP layout (else SD 1 HF CLIP)."""
    return any(k.startswith(OPEN_CLIP) for k in sd)


def open_clip_layers(sd: Mapping[str, Any]) -> int:
    """Number of residual blocks of an OpenCLIP text tower state dict (``model.transformer.resblocks.N``)."""
    prefix = OPEN_CLIP + _OPEN_BLOCK
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)), default=-1)


def _block_to_hf(rest: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One OpenCLIP block entry -> transformers CLIP entries (``in_proj`` split into q, k, v)."""
    if rest.startswith("attn.in_proj_"):
        suffix = "weight" if rest.endswith("weight") else "bias"
        q, k, v = value.chunk(3, dim=0)
        return {f"self_attn.q_proj.{suffix}": q, f"self_attn.k_proj.{suffix}": k, f"self_attn.v_proj.{suffix}": v}
    for ours, theirs in _BLOCK_RENAMES:
        if rest.startswith(ours + "."):
            return {theirs + rest[len(ours):]: value}
    raise KeyError(f"unknown OpenCLIP text block key '{rest}'")


def text_to_diffusers(sd: Mapping[str, torch.Tensor], keep_blocks: int | None = None) -> dict[str, torch.Tensor]:
    """Our text encoder (names after ``cond_stage_model.``) -> transformers ``CLIPTextModel`` names.

    ``keep_blocks`` (SD 2) writes only the first blocks: the penultimate-layer encoder is the first N-1 blocks.
    """
    if not is_open_clip(sd):
        return {k[len(HF_CLIP):]: v for k, v in sd.items()
                if k.startswith(HF_CLIP) and not k.endswith("embeddings.position_ids")}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        name = key[len(OPEN_CLIP):]
        if name in _TOP_RENAMES:
            out[_TOP_RENAMES[name]] = value
        elif name.startswith(_OPEN_BLOCK):
            index, rest = name[len(_OPEN_BLOCK):].split(".", 1)
            if keep_blocks is None or int(index) < keep_blocks:
                out.update({f"{_HF_BLOCK}{index}.{k}": v for k, v in _block_to_hf(rest, value).items()})
        elif name not in _UNUSED_SD2:
            raise KeyError(f"unknown OpenCLIP text key '{key}'")
    return out


def _with_text_model(key: str) -> str:
    """transformers 5 saves ``CLIPTextModel`` without the ``text_model.`` prefix that older files carry."""
    return key if key.startswith("text_model.") or key.startswith("text_projection.") else "text_model." + key


def text_from_diffusers(sd: Mapping[str, torch.Tensor], open_clip: bool) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` state dict -> our text encoder names (SD 2 OpenCLIP when ``open_clip``)."""
    sd = {_with_text_model(k): v for k, v in sd.items() if not k.endswith("embeddings.position_ids")}
    if not open_clip:
        return {HF_CLIP + k: v for k, v in sd.items()}
    top = {theirs: ours for ours, theirs in _TOP_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in top:
            out[OPEN_CLIP + top[key]] = value
        elif key == "text_projection.weight":  # CLIPTextModelWithProjection: Linear, ours is a matrix x @ P
            out[OPEN_CLIP + "text_projection"] = value.t().contiguous()
        elif key.startswith(_HF_BLOCK):
            index, rest = key[len(_HF_BLOCK):].split(".", 1)
            if rest.startswith("self_attn.") and rest.split(".")[1] in {"q_proj", "k_proj", "v_proj"}:
                continue  # packed below
            name = next((o + rest[len(t):] for o, t in _BLOCK_RENAMES if rest.startswith(t + ".")), None)
            if name is None:
                raise KeyError(f"unknown CLIP text encoder key '{key}'")
            out[f"{OPEN_CLIP}{_OPEN_BLOCK}{index}.{name}"] = value
        else:
            raise KeyError(f"unknown CLIP text encoder key '{key}'")
    for key in [k for k in sd if k.endswith("self_attn.q_proj.weight") or k.endswith("self_attn.q_proj.bias")]:
        head, suffix = key.rsplit(".q_proj.", 1)
        index = head[len(_HF_BLOCK):].split(".")[0]
        packed = torch.cat([sd[f"{head}.{p}_proj.{suffix}"] for p in "qkv"], dim=0)
        out[f"{OPEN_CLIP}{_OPEN_BLOCK}{index}.attn.in_proj_{suffix}"] = packed
    return out


def text_config(sd: Mapping[str, torch.Tensor], heads: int, keep_blocks: int | None = None,
                hidden_act: str = "quick_gelu", eps: float = 1e-5) -> dict[str, Any]:
    """transformers ``CLIPTextConfig`` values for our text encoder state dict (``cond_stage_model``-local names)."""
    if is_open_clip(sd):
        vocab, width = sd[OPEN_CLIP + "token_embedding.weight"].shape
        positions = sd[OPEN_CLIP + "positional_embedding"].shape[0]
        inner = sd[f"{OPEN_CLIP}{_OPEN_BLOCK}0.mlp.c_fc.weight"].shape[0]
        layers = keep_blocks if keep_blocks is not None else open_clip_layers(sd)
        projection = sd.get(OPEN_CLIP + "text_projection")
        hidden_act, proj_dim = "gelu", int(projection.shape[1]) if projection is not None else int(width)
    else:
        base = HF_CLIP + "text_model."
        vocab, width = sd[base + "embeddings.token_embedding.weight"].shape
        positions = sd[base + "embeddings.position_embedding.weight"].shape[0]
        inner = sd[base + "encoder.layers.0.mlp.fc1.weight"].shape[0]
        layers = 1 + max(int(k[len(base + "encoder.layers."):].split(".")[0])
                         for k in sd if k.startswith(base + "encoder.layers."))
        proj_dim = int(width)
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": int(vocab),
            "hidden_size": int(width), "intermediate_size": int(inner), "num_hidden_layers": int(layers),
            "num_attention_heads": int(heads), "max_position_embeddings": int(positions), "hidden_act": hidden_act,
            "layer_norm_eps": eps, "projection_dim": proj_dim, "bos_token_id": 49406, "eos_token_id": 49407,
            "pad_token_id": 1}


def add_unused_open_clip(sd: dict[str, torch.Tensor], projection_dim: int) -> list[str]:
    """Append, in place, the OpenCLIP entries SD 2 never reads and diffusers folders omit; returns their names.

    One more residual block (zeros, shaped as block 0: SD 2 encodes with the penultimate block), ``text_projection``
    [width, projection_dim] (zeros) and ``logit_scale`` (CLIP's initial ln(1/0.07)).
    """
    last = open_clip_layers(sd)
    first = f"{OPEN_CLIP}{_OPEN_BLOCK}0."
    added = {f"{OPEN_CLIP}{_OPEN_BLOCK}{last}." + k[len(first):]: torch.zeros_like(v)
             for k, v in sd.items() if k.startswith(first)}
    width = sd[OPEN_CLIP + "token_embedding.weight"].shape[1]
    dtype = sd[OPEN_CLIP + "token_embedding.weight"].dtype
    added[OPEN_CLIP + "text_projection"] = torch.zeros(width, projection_dim, dtype=dtype)
    added[OPEN_CLIP + "logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=dtype)
    added = {k: v for k, v in added.items() if k not in sd}  # a CLIPTextModelWithProjection has its projection
    sd.update(added)
    return sorted(added)

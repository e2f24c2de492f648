"""Pure key converters between the original Stable Diffusion state-dict layout and diffusers' per-component layouts.

Ours: one state dict with ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE) and
``cond_stage_model.*`` (text encoder). diffusers: one state dict per folder (``unet/``, ``vae/``, ``text_encoder/``).
Each function takes and returns plain ``{name: tensor}`` dicts (component-local names, no prefixes) and never copies
tensor data except where a reshape or split is needed. The architecture parameters come from our YAML config.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."

_RESNET_RENAMES = [("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                   ("out_layers.0", "norm2"), ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut")]
_VAE_RESNET_RENAMES = [("nin_shortcut", "conv_shortcut")]
_VAE_ATTN_RENAMES = [("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0")]


def _get(params: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """``params[name]`` for dicts and OmegaConf nodes alike."""
    return params.get(name, default) if hasattr(params, "get") else getattr(params, name, default)


def _levels_with_attention(params: Mapping[str, Any]) -> list[bool]:
    """For each UNet level, whether its blocks carry a spatial transformer."""
    resolutions = set(_get(params, "attention_resolutions", []) or [])
    return [2 ** i in resolutions for i in range(len(_get(params, "channel_mult")))]


def _unet_blocks(params: Mapping[str, Any]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """``(our block prefix, diffusers block prefix, inner renames)`` for every block of the UNet."""
    nrb, attn = int(_get(params, "num_res_blocks")), _levels_with_attention(params)
    levels = len(attn)
    blocks = [("time_embed.0", "time_embedding.linear_1", []), ("time_embed.2", "time_embedding.linear_2", []),
              ("input_blocks.0.0", "conv_in", []), ("out.0", "conv_norm_out", []), ("out.2", "conv_out", []),
              ("middle_block.0", "mid_block.resnets.0", _RESNET_RENAMES),
              ("middle_block.1", "mid_block.attentions.0", []),
              ("middle_block.2", "mid_block.resnets.1", _RESNET_RENAMES)]
    for i in range(levels):
        for j in range(nrb):
            n = 1 + i * (nrb + 1) + j
            blocks.append((f"input_blocks.{n}.0", f"down_blocks.{i}.resnets.{j}", _RESNET_RENAMES))
            if attn[i]:
                blocks.append((f"input_blocks.{n}.1", f"down_blocks.{i}.attentions.{j}", []))
        if i < levels - 1:
            blocks.append((f"input_blocks.{1 + i * (nrb + 1) + nrb}.0.op", f"down_blocks.{i}.downsamplers.0.conv", []))
    for i in range(levels):  # diffusers' up_blocks.0 is our deepest level
        has_attn = attn[levels - 1 - i]
        for j in range(nrb + 1):
            n = i * (nrb + 1) + j
            blocks.append((f"output_blocks.{n}.0", f"up_blocks.{i}.resnets.{j}", _RESNET_RENAMES))
            if has_attn:
                blocks.append((f"output_blocks.{n}.1", f"up_blocks.{i}.attentions.{j}", []))
        if i < levels - 1:
            n = i * (nrb + 1) + nrb
            blocks.append((f"output_blocks.{n}.{2 if has_attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", []))
    return blocks


def _vae_blocks(ddconfig: Mapping[str, Any]) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """``(our block prefix, diffusers block prefix, inner renames)`` for every block of the autoencoder."""
    levels, nrb = len(_get(ddconfig, "ch_mult")), int(_get(ddconfig, "num_res_blocks"))
    blocks = [("quant_conv", "quant_conv", []), ("post_quant_conv", "post_quant_conv", [])]
    for part in ("encoder", "decoder"):
        blocks += [(f"{part}.conv_in", f"{part}.conv_in", []), (f"{part}.conv_out", f"{part}.conv_out", []),
                   (f"{part}.norm_out", f"{part}.conv_norm_out", []),
                   (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET_RENAMES),
                   (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET_RENAMES),
                   (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", _VAE_ATTN_RENAMES)]
    for i in range(levels):
        for j in range(nrb):
            blocks.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RESNET_RENAMES))
        if i < levels - 1:
            blocks.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", []))
        up = levels - 1 - i  # our decoder.up[i] runs at resolution level i; diffusers counts from the deepest
        for j in range(nrb + 1):
            blocks.append((f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}", _VAE_RESNET_RENAMES))
        if i > 0:
            blocks.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{up}.upsamplers.0.conv", []))
    return blocks


def _rename(name: str, renames: list[tuple[str, str]], reverse: bool) -> str:
    """Apply the first matching inner rename to the block-local ``name``."""
    for ours, theirs in renames:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if name == src or name.startswith(src + "."):
            return dst + name[len(src):]
    return name


def _convert(sd: Mapping[str, torch.Tensor], blocks: list[tuple[str, str, list[tuple[str, str]]]],
             reverse: bool, what: str) -> dict[str, torch.Tensor]:
    """Rename every key of ``sd`` by its block table; a key outside every block is a ``KeyError`` naming it."""
    table = {(theirs if reverse else ours): (ours if reverse else theirs, renames) for ours, theirs, renames in blocks}
    out, unknown = {}, []
    for key, value in sd.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            hit = table.get(".".join(parts[:cut]))
            if hit is not None:
                out[hit[0] + "." + _rename(".".join(parts[cut:]), hit[1], reverse)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"{len(unknown)} {what} key(s) match no block of this architecture, e.g. "
                       f"{', '.join(unknown[:5])}")
    return out


def unet_to_diffusers(sd: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our UNet state dict (names after ``model.diffusion_model.``) -> diffusers ``UNet2DConditionModel`` names."""
    return _convert(sd, _unet_blocks(unet_params), False, "UNet")


def unet_from_diffusers(sd: Mapping[str, torch.Tensor], unet_params: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> our UNet names (without ``model.diffusion_model.``)."""
    return _convert(sd, _unet_blocks(unet_params), True, "UNet")


def _is_vae_attention_matrix(name: str) -> bool:
    """Whether ``name`` is a q/k/v/proj weight of a VAE mid-block attention (1x1 conv ours, linear theirs)."""
    return ".mid.attn_1." in name and name.split(".")[-2] in {"q", "k", "v", "proj_out"} and name.endswith("weight")


def vae_to_diffusers(sd: Mapping[str, torch.Tensor], ddconfig: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Our autoencoder state dict (names after ``first_stage_model.``) -> diffusers ``AutoencoderKL`` names."""
    shaped = {k: (v[:, :, 0, 0] if _is_vae_attention_matrix(k) and v.dim() == 4 else v) for k, v in sd.items()}
    return _convert(shaped, _vae_blocks(ddconfig), False, "VAE")


def vae_from_diffusers(sd: Mapping[str, torch.Tensor], ddconfig: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` state dict -> our autoencoder names (without ``first_stage_model.``)."""
    out = _convert(sd, _vae_blocks(ddconfig), True, "VAE")
    return {k: (v[:, :, None, None] if _is_vae_attention_matrix(k) and v.dim() == 2 else v) for k, v in out.items()}


def _heads_per_level(params: Mapping[str, Any]) -> list[int]:
    """Attention heads of each UNet level (fixed ``num_heads`` or channels / ``num_head_channels``)."""
    base, heads, head_ch = int(_get(params, "model_channels")), _get(params, "num_heads", -1), \
        _get(params, "num_head_channels", -1)
    mult = list(_get(params, "channel_mult"))
    if head_ch is not None and int(head_ch) != -1:
        return [base * m // int(head_ch) for m in mult]
    return [int(heads)] * len(mult)


def unet_config(unet_params: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for diffusers' ``UNet2DConditionModel`` equivalent to our ``UNetModel`` params."""
    attn = _levels_with_attention(unet_params)
    base, mult = int(_get(unet_params, "model_channels")), list(_get(unet_params, "channel_mult"))
    depth = _get(unet_params, "transformer_depth", 1)
    return {
        "sample_size": int(_get(unet_params, "image_size", 64)),
        "in_channels": int(_get(unet_params, "in_channels")), "out_channels": int(_get(unet_params, "out_channels")),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [base * m for m in mult], "layers_per_block": int(_get(unet_params, "num_res_blocks")),
        "cross_attention_dim": int(_get(unet_params, "context_dim")),
        "attention_head_dim": _heads_per_level(unet_params),
        "use_linear_projection": bool(_get(unet_params, "use_linear_in_transformer", False)),
        "transformer_layers_per_block": int(depth if not isinstance(depth, (list, tuple)) else depth[0]),
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
        "upcast_attention": False,
    }


def vae_config(first_stage_params: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for diffusers' ``AutoencoderKL`` equivalent to our ``AutoencoderKL`` params."""
    dd = _get(first_stage_params, "ddconfig")
    channels = [int(_get(dd, "ch")) * m for m in _get(dd, "ch_mult")]
    return {
        "in_channels": int(_get(dd, "in_channels")), "out_channels": int(_get(dd, "out_ch")),
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "block_out_channels": channels, "layers_per_block": int(_get(dd, "num_res_blocks")),
        "latent_channels": int(_get(dd, "z_channels")), "norm_num_groups": 32, "act_fn": "silu",
        "sample_size": int(_get(dd, "resolution")),
    }

"""The Stable Diffusion UNet (``UNetModel``), with the original module tree and keys; its building blocks are in
``unet_blocks.py`` (re-exported here)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.unet_blocks import (  # the blocks, importable from here as in the original
    AttentionBlock,
    Downsample,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    TimestepBlock,
    TimestepEmbedSequential,
    Upsample,
    attention_heads,
)
from ldm.modules.diffusionmodules.util import conv_nd, linear, normalization, timestep_embedding, zero_module

__all__ = ["AttentionBlock", "Downsample", "QKVAttention", "QKVAttentionLegacy", "ResBlock", "TimestepBlock",
           "TimestepEmbedSequential", "UNetModel", "Upsample", "attention_heads"]


def _to_dtype(context: Any, dtype: torch.dtype) -> Any:
    """Cast a context tensor (or a list of them) to ``dtype``; other values pass through."""
    if torch.is_tensor(context):
        return context.to(dtype)
    if isinstance(context, (list, tuple)):
        return [_to_dtype(c, dtype) for c in context]
    return context


class UNetModel(nn.Module):
    """The diffusion UNet with attention and timestep embedding: x [B, in, H, W] -> [B, out, H, W].

    Constructor arguments, module tree and state_dict keys are those of the original SD 1/2 UNet.
    ``use_fp16`` is recorded but casts nothing: the network computes in the dtype of its weights
    (call ``.half()`` or use autocast to run in float16), so float16 configs also run on CPU.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int | Sequence[int], attention_resolutions: Sequence[int], dropout: float = 0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | str | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, num_heads_upsample: int = -1,
                 use_scale_shift_norm: bool = False, resblock_updown: bool = False,
                 use_new_attention_order: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int | Sequence[int] = 1, context_dim: int | Sequence[int] | None = None,
                 n_embed: int | None = None, legacy: bool = True,
                 disable_self_attentions: Sequence[bool] | None = None,
                 num_attention_blocks: Sequence[int] | None = None, disable_middle_self_attn: bool = False,
                 use_linear_in_transformer: bool = False, adm_in_channels: int | None = None) -> None:
        super().__init__()
        self._check_args(use_spatial_transformer, context_dim, num_heads, num_head_channels)
        if context_dim is not None and not isinstance(context_dim, int):
            context_dim = list(context_dim)  # OmegaConf ListConfig -> list
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.num_res_blocks = self._per_level_blocks(channel_mult, num_res_blocks, disable_self_attentions,
                                                     num_attention_blocks)
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.model_channels = model_channels
        self.attention_resolutions = attention_resolutions
        self.dropout, self.channel_mult, self.conv_resample = dropout, channel_mult, conv_resample
        self.num_classes, self.use_checkpoint, self.use_fp16 = num_classes, use_checkpoint, use_fp16
        self.num_heads, self.num_head_channels = num_heads, num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.predict_codebook_ids = n_embed is not None
        self._attn = dict(num_heads=num_heads, num_head_channels=num_head_channels, legacy=legacy,
                          use_spatial_transformer=use_spatial_transformer, use_checkpoint=use_checkpoint,
                          use_new_attention_order=use_new_attention_order,
                          transformer_depth=self._per_level_depths(channel_mult, transformer_depth),
                          context_dim=context_dim, use_linear=use_linear_in_transformer,
                          disable_self_attentions=disable_self_attentions,
                          num_attention_blocks=num_attention_blocks)
        self._res = dict(dropout=dropout, dims=dims, use_checkpoint=use_checkpoint,
                         use_scale_shift_norm=use_scale_shift_norm)
        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(linear(model_channels, time_embed_dim), nn.SiLU(),
                                        linear(time_embed_dim, time_embed_dim))
        if num_classes is not None:
            self.label_emb = self._label_embedding(num_classes, time_embed_dim, adm_in_channels)
        ch, input_block_chans = self._build_input_blocks(time_embed_dim, resblock_updown)
        self._build_middle_block(ch, time_embed_dim, disable_middle_self_attn)
        ch = self._build_output_blocks(ch, input_block_chans, time_embed_dim, resblock_updown)
        self.out = nn.Sequential(normalization(ch), nn.SiLU(),
                                 zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)))
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))

    @staticmethod
    def _check_args(use_spatial_transformer: bool, context_dim: Any, num_heads: int, num_head_channels: int) -> None:
        """Reject the argument combinations the original asserts against, with a readable message."""
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of the cross-attention context)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError("context_dim is only used with use_spatial_transformer=True; set it or drop context_dim")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")

    @staticmethod
    def _per_level_blocks(channel_mult: Sequence[int], num_res_blocks: int | Sequence[int],
                          disable_self_attentions: Sequence[bool] | None,
                          num_attention_blocks: Sequence[int] | None) -> list[int]:
        """ResBlocks per level (an int applies to every level); checks the other per-level lists."""
        levels = len(channel_mult)
        blocks = [num_res_blocks] * levels if isinstance(num_res_blocks, int) else list(num_res_blocks)
        if len(blocks) != levels:
            raise ValueError("num_res_blocks must be an int or have one entry per channel_mult level")
        if disable_self_attentions is not None and len(disable_self_attentions) != levels:
            raise ValueError("disable_self_attentions must have one entry per channel_mult level")
        if num_attention_blocks is not None and (
                len(num_attention_blocks) != levels or any(n > r for n, r in zip(num_attention_blocks, blocks))):
            raise ValueError("num_attention_blocks needs one entry per level, each <= num_res_blocks there")
        return blocks

    @staticmethod
    def _per_level_depths(channel_mult: Sequence[int], transformer_depth: int | Sequence[int]) -> list[int]:
        """Transformer blocks per level (an int applies to every level; the middle block uses the last level's)."""
        levels = len(channel_mult)
        if isinstance(transformer_depth, int):
            return [transformer_depth] * levels
        depths = [int(d) for d in transformer_depth]
        if len(depths) != levels:
            raise ValueError(f"transformer_depth must be an int or have one entry per channel_mult level ({levels}), "
                             f"got {depths}")
        return depths

    @staticmethod
    def _label_embedding(num_classes: int | str, dim: int, adm_in_channels: int | None) -> nn.Module:
        """Class / continuous / sequential (adm) label embedding into the time-embedding width."""
        if isinstance(num_classes, int):
            return nn.Embedding(num_classes, dim)
        if num_classes == "continuous":
            return nn.Linear(1, dim)
        if num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError("num_classes='sequential' needs adm_in_channels")
            return nn.Sequential(nn.Sequential(linear(adm_in_channels, dim), nn.SiLU(), linear(dim, dim)))
        raise ValueError(f"num_classes must be an int, 'continuous' or 'sequential', got {num_classes!r}")

    def _res_block(self, ch: int, emb_dim: int, out_ch: int | None = None, **kw: Any) -> ResBlock:
        return ResBlock(ch, emb_dim, self._res["dropout"], out_channels=out_ch, dims=self._res["dims"],
                        use_checkpoint=self._res["use_checkpoint"],
                        use_scale_shift_norm=self._res["use_scale_shift_norm"], **kw)

    def _attention(self, ch: int, level: int | None, index: int, upsample: bool = False,
                   disable_self_attn: bool | None = None) -> nn.Module | None:
        """The attention layer after a ResBlock (None where num_attention_blocks leaves it out)."""
        a = self._attn
        if level is not None and a["num_attention_blocks"] is not None and index >= a["num_attention_blocks"][level]:
            return None
        num_heads, dim_head = attention_heads(ch, a["num_heads"], a["num_head_channels"], a["legacy"],
                                              a["use_spatial_transformer"])
        if not a["use_spatial_transformer"]:
            return AttentionBlock(ch, use_checkpoint=a["use_checkpoint"],
                                  num_heads=self.num_heads_upsample if upsample else num_heads,
                                  num_head_channels=dim_head, use_new_attention_order=a["use_new_attention_order"])
        if disable_self_attn is None:
            disabled = a["disable_self_attentions"]
            disable_self_attn = bool(disabled[level]) if disabled is not None else False
        depth = a["transformer_depth"][-1 if level is None else level]
        return SpatialTransformer(ch, num_heads, dim_head, depth=depth, context_dim=a["context_dim"],
                                  disable_self_attn=disable_self_attn, use_linear=a["use_linear"],
                                  use_checkpoint=a["use_checkpoint"])

    def _build_input_blocks(self, emb_dim: int, resblock_updown: bool) -> tuple[int, list[int]]:
        dims = self._res["dims"]
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, self.in_channels, self.model_channels, 3, padding=1))])
        ch, ds, chans = self.model_channels, 1, [self.model_channels]
        for level, mult in enumerate(self.channel_mult):
            for nr in range(self.num_res_blocks[level]):
                layers = [self._res_block(ch, emb_dim, mult * self.model_channels)]
                ch = mult * self.model_channels
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, level, nr))
                self.input_blocks.append(TimestepEmbedSequential(*[m for m in layers if m is not None]))
                chans.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (self._res_block(ch, emb_dim, ch, down=True) if resblock_updown
                        else Downsample(ch, self.conv_resample, dims=dims, out_channels=ch))
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self._ds = ds
        return ch, chans

    def _build_middle_block(self, ch: int, emb_dim: int, disable_middle_self_attn: bool) -> None:
        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, emb_dim),
            self._attention(ch, None, 0, disable_self_attn=disable_middle_self_attn),
            self._res_block(ch, emb_dim))

    def _build_output_blocks(self, ch: int, chans: list[int], emb_dim: int, resblock_updown: bool) -> int:
        self.output_blocks = nn.ModuleList([])
        ds = self._ds
        for level, mult in list(enumerate(self.channel_mult))[::-1]:
            for i in range(self.num_res_blocks[level] + 1):
                layers = [self._res_block(ch + chans.pop(), emb_dim, self.model_channels * mult)]
                ch = self.model_channels * mult
                if ds in self.attention_resolutions:
                    layers.append(self._attention(ch, level, i, upsample=True))
                if level and i == self.num_res_blocks[level]:
                    layers.append(self._res_block(ch, emb_dim, ch, up=True) if resblock_updown
                                  else Upsample(ch, self.conv_resample, dims=self._res["dims"], out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*[m for m in layers if m is not None]))
        return ch

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network computes in: that of its weights."""
        return self.time_embed[0].weight.dtype

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor | None = None, context: Any = None,
                y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        """x [B, C, H, W], timesteps [B] (int or float), context [B, M, D], y [B] labels -> [B, out, H, W]."""
        if timesteps is None:
            raise ValueError("UNetModel.forward needs timesteps (a [B] tensor of int or float diffusion times)")
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y (class labels) if and only if the model is class-conditional (num_classes)")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.num_classes is not None:
            if y.shape[0] != x.shape[0]:
                raise ValueError(f"y has batch size {y.shape[0]} but x has {x.shape[0]}")
            emb = emb + self.label_emb(y.to(dtype) if y.is_floating_point() else y)
        context = _to_dtype(context, dtype)
        h, hs = x.to(dtype), []
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context, output_size=hs[-1].shape[2:] if hs else None)
        out = self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
        return out.to(x.dtype)

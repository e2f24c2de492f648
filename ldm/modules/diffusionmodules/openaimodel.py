"""The Stable Diffusion UNet (``UNetModel``) and its building blocks, with the original module tree and keys."""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import ConfigurableAttention, SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the module to ``x`` given the timestep embedding ``emb`` [B, E]."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """Sequential that passes the timestep embedding and the context to the children that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Any = None,
                output_size: Sequence[int] | None = None) -> torch.Tensor:
        """x [B, C, H, W], emb [B, E], context [B, M, D] (or a list of them) or None; ``output_size`` is the
        spatial size an ``Upsample`` child produces (the next skip connection's; None: twice its input)."""
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling (spatial dims only for 3D), optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor, output_size: Sequence[int] | None = None) -> torch.Tensor:
        """[B, C, H, W] -> [B, C_out, 2H, 2W], or [B, C_out, *output_size] when given (odd-sized skips)."""
        if x.shape[1] != self.channels:
            raise ValueError(f"Upsample expects {self.channels} channels, got {x.shape[1]}")
        spatial = tuple(x.shape[2:])
        doubled = (spatial[0], *(2 * n for n in spatial[1:])) if self.dims == 3 else tuple(2 * n for n in spatial)
        if output_size is not None and tuple(output_size) != doubled:
            x = F.interpolate(x, tuple(output_size), mode="nearest")  # as diffusers' upsample_size
        elif self.dims == 3:
            x = F.interpolate(x, doubled, mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 downsampling: a 3x3 conv (``use_conv``) or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.channels != self.out_channels:
                raise ValueError("Downsample without a conv cannot change the number of channels")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C_out, ceil(H/2), ceil(W/2)]."""
        if x.shape[1] != self.channels:
            raise ValueError(f"Downsample expects {self.channels} channels, got {x.shape[1]}")
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding: [B, C, H, W], [B, E] -> [B, C_out, H', W']."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm
        out_ch = self.out_channels
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_ch, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, 2 * out_ch if use_scale_shift_norm else out_ch))
        self.out_layers = nn.Sequential(normalization(out_ch), nn.SiLU(), nn.Dropout(p=dropout),
                                        zero_module(conv_nd(dims, out_ch, out_ch, 3, padding=1)))
        if out_ch == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, out_ch, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """Apply the block; gradient-checkpointed when ``use_checkpoint``."""
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(emb_out, 2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class QKVAttentionLegacy(ConfigurableAttention):
    """Attention on a packed qkv [B, H*3*C, T] (heads outermost) -> [B, H*C, T]."""

    def __init__(self, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """Split per head into q, k, v, then softmax(q k^T / sqrt(C)) v."""
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = qkv.reshape(bs, self.n_heads, 3 * ch, length).split(ch, dim=2)
        return self._attend_channels_first(q, k, v, bs, length)

    def _attend_channels_first(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bs: int,
                               length: int) -> torch.Tensor:
        """q, k, v [B, H, C, T] -> [B, H*C, T]."""
        out = self.attend(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return out.transpose(-1, -2).reshape(bs, -1, length)


class QKVAttention(QKVAttentionLegacy):
    """Attention on a packed qkv [B, 3*H*C, T] (q, k, v outermost) -> [B, H*C, T]."""

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """Split into q, k, v, then per head softmax(q k^T / sqrt(C)) v."""
        bs, width, length = qkv.shape
        ch = width // (3 * self.n_heads)
        q, k, v = (t.reshape(bs, self.n_heads, ch, length) for t in qkv.chunk(3, dim=1))
        return self._attend_channels_first(q, k, v, bs, length)


class AttentionBlock(nn.Module):
    """Legacy spatial self-attention (no context): [B, C, *spatial] -> same shape."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_checkpoint: bool = False, use_new_attention_order: bool = False) -> None:
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels != 0:
                raise ValueError(f"channels {channels} is not divisible by num_head_channels {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = (QKVAttention if use_new_attention_order else QKVAttentionLegacy)(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the block (the original always checkpoints it; here only when ``use_checkpoint``)."""
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


def attention_heads(ch: int, num_heads: int, num_head_channels: int, legacy: bool,
                    use_spatial_transformer: bool) -> tuple[int, int]:
    """(num_heads, dim_head) of an attention layer on ``ch`` channels, by the original UNet's rule."""
    if num_head_channels == -1:
        dim_head = ch // num_heads
    else:
        num_heads = ch // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = ch // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


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

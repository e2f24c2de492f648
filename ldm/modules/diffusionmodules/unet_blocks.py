"""The building blocks of the Stable Diffusion UNet (``openaimodel.UNetModel``): timestep-conditioned residual
blocks, up/down-sampling and the legacy attention block, with the original module trees and state_dict keys."""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import ConfigurableAttention, SpatialTransformer
from ldm.modules.diffusionmodules.util import avg_pool_nd, checkpoint, conv_nd, linear, normalization, zero_module


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


class _Resample(nn.Module):
    """What Upsample and Downsample record: channels in and out, whether a conv resamples, the dims."""

    def __init__(self, channels: int, use_conv: bool, dims: int, out_channels: int | None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims


class Upsample(_Resample):
    """Nearest-neighbour x2 upsampling (spatial dims only for 3D), optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1) -> None:
        super().__init__(channels, use_conv, dims, out_channels)
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


class Downsample(_Resample):
    """Stride-2 downsampling: a 3x3 conv (``use_conv``) or average pooling."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1) -> None:
        super().__init__(channels, use_conv, dims, out_channels)
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

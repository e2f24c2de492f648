"""Attention layers of the UNet (cross-attention, transformer blocks) and the selectable attention kernel.

Every attention module derives from :class:`ConfigurableAttention`; its kernel is chosen per module with
:func:`set_attention_backend` (no globals, no environment variables):

* ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention``;
* ``"math"``: explicit ``softmax(q k^T * scale) v`` in the input dtype;
* ``"math-fp32"``: the same with ``q k^T`` and the softmax in float32 (fp16 stability; the SD2 default);
* ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (only when installed).

Any backend can also process the queries in chunks (``chunk_size``, "attention slicing") to bound memory.
"""
from __future__ import annotations

import importlib.util
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ldm.modules.diffusionmodules.util import checkpoint, zero_module

ATTENTION_BACKENDS = ("sdpa", "math", "math-fp32", "xformers")


def _check_backend(backend: str, chunk_size: int | None) -> None:
    """Raise a clear error for an unknown backend, a missing xformers or a bad chunk size."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend '{backend}'; choose one of {', '.join(ATTENTION_BACKENDS)}")
    if backend == "xformers" and importlib.util.find_spec("xformers") is None:
        raise ImportError("attention backend 'xformers' was chosen but xformers is not installed; "
                          "install it (pip install xformers) or use the default 'sdpa' backend")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    scale: float, upcast: bool) -> torch.Tensor:
    """Explicit softmax attention; with ``upcast`` the scores and softmax are computed in float32."""
    if upcast:
        q, k = q.float(), k.float()
    sim = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        sim = sim.masked_fill(~mask, -torch.finfo(sim.dtype).max)
    return torch.matmul(sim.softmax(dim=-1).to(v.dtype), v)


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """xformers memory-efficient attention on [B, H, N, D] tensors."""
    if mask is not None:
        raise ValueError("attention masks are not supported by the 'xformers' backend; use 'sdpa' or 'math'")
    import xformers.ops  # optional dependency, imported only when chosen

    out = xformers.ops.memory_efficient_attention(
        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(),
        scale=scale)
    return out.transpose(1, 2)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """One (unchunked) attention call with the chosen backend."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if backend in ("math", "math-fp32"):
        return _math_attention(q, k, v, mask, scale, upcast=backend == "math-fp32")
    if backend == "xformers":
        return _xformers_attention(q, k, v, mask, scale)
    raise ValueError(f"unknown attention backend '{backend}'; choose one of {', '.join(ATTENTION_BACKENDS)}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa",
              chunk_size: int | None = None, mask: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Softmax attention: q [B, H, N, D], k/v [B, H, M, D] -> [B, H, N, D].

    ``mask`` (bool, True = attend) broadcasts to [B, H, N, M]; ``scale`` defaults to D ** -0.5;
    ``chunk_size`` processes at most that many queries at a time.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    n = q.shape[2]
    if chunk_size is None or n <= chunk_size:
        return _attend(q, k, v, backend, mask, scale)
    outs = []
    for start in range(0, n, chunk_size):
        m = mask[:, :, start:start + chunk_size] if mask is not None and mask.shape[2] > 1 else mask
        outs.append(_attend(q[:, :, start:start + chunk_size], k, v, backend, m, scale))
    return torch.cat(outs, dim=2)


class ConfigurableAttention(nn.Module):
    """Base class of the attention modules whose kernel :func:`set_attention_backend` selects."""

    attn_backend: str = "sdpa"
    attn_chunk_size: int | None = None

    def set_backend(self, backend: str, chunk_size: int | None = None) -> None:
        """Use ``backend`` (one of ATTENTION_BACKENDS) with optional query chunking for this module."""
        _check_backend(backend, chunk_size)
        self.attn_backend, self.attn_chunk_size = backend, chunk_size

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
               scale: float | None = None) -> torch.Tensor:
        """Attention over [B, H, N, D] tensors with this module's backend."""
        return attention(q, k, v, self.attn_backend, self.attn_chunk_size, mask, scale)


def set_attention_backend(model: nn.Module, backend: str, chunk_size: int | None = None) -> int:
    """Select the attention kernel of every attention module inside ``model``; returns how many were set.

    ``backend`` is one of ``"sdpa"``, ``"math"``, ``"math-fp32"``, ``"xformers"``; ``chunk_size`` (optional)
    splits the queries into chunks of at most that many tokens (attention slicing, less memory).
    """
    _check_backend(backend, chunk_size)
    count = 0
    for module in model.modules():
        if isinstance(module, ConfigurableAttention):
            module.set_backend(backend, chunk_size)
            count += 1
    return count


class CrossAttention(ConfigurableAttention):
    """Multi-head (cross-)attention: x [B, N, query_dim], context [B, M, context_dim] -> [B, N, query_dim]."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention when ``context`` is None; ``mask`` [B, M] (bool, True = keep) masks context tokens."""
        context = x if context is None else context
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if mask is not None:
            mask = rearrange(mask.bool(), "b ... -> b 1 1 (...)")
        out = self.attend(q, k, v, mask, self.scale)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class GEGLU(nn.Module):
    """Gated GELU projection: [..., dim_in] -> [..., dim_out]."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``a * gelu(gate)`` with ``a, gate`` the two halves of the projection."""
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """Transformer MLP (GEGLU when ``glu``): [..., dim] -> [..., dim_out]."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the MLP."""
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention and feed-forward, each pre-normed and residual: [B, N, dim] -> same."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None,
                 gated_ff: bool = True, checkpoint: bool = True, disable_self_attn: bool = False) -> None:
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout,
                                    context_dim=context_dim if disable_self_attn else None)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, N, dim], context [B, M, context_dim] or None; gradient-checkpointed when enabled."""
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


def _per_block(value: object, depth: int, what: str) -> list:
    """Broadcast a single value (or one-element list) to ``depth`` entries; check a list's length."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(values) == 1:
        values = values * depth
    if len(values) != depth:
        raise ValueError(f"{what} has {len(values)} entries but the transformer has depth {depth}")
    return values


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image: x [B, C, H, W], context [B, M, context_dim] -> [B, C, H, W].

    Norm, projection in (1x1 conv, or Linear when ``use_linear``), ``depth`` transformer blocks, zero-initialised
    projection out, residual. ``context_dim`` (and the ``context`` given to forward) may be a list, one per block.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | Sequence[int] | None = None, disable_self_attn: bool = False,
                 use_linear: bool = False, use_checkpoint: bool = True) -> None:
        super().__init__()
        if isinstance(context_dim, (list, tuple)) and len(set(context_dim)) == 1:
            context_dim = context_dim[0]  # a list of equal widths fits any depth (as in sgm)
        context_dims = _per_block(context_dim, depth, "context_dim")
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1, stride=1, padding=0)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dims[d],
                                  disable_self_attn=disable_self_attn, checkpoint=use_checkpoint)
            for d in range(depth))
        # The original builds the linear proj_out as Linear(in_channels, inner_dim), which only works (and has
        # the same weight shape as this one) when inner_dim == in_channels, as in every SD config.
        if use_linear:
            self.proj_out = zero_module(nn.Linear(inner_dim, in_channels))
        else:
            self.proj_out = zero_module(nn.Conv2d(inner_dim, in_channels, kernel_size=1, stride=1, padding=0))
        self.use_linear = use_linear

    def forward(self, x: torch.Tensor, context: torch.Tensor | list | None = None) -> torch.Tensor:
        """Apply the transformer to every pixel; output has the shape of ``x``."""
        contexts = _per_block(context, len(self.transformer_blocks), "context")
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = rearrange(x, "b c h w -> b (h w) c").contiguous()
        if self.use_linear:
            x = self.proj_in(x)
        for block, ctx in zip(self.transformer_blocks, contexts):
            x = block(x, context=ctx)
        if self.use_linear:
            x = self.proj_out(x)
        x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class LinearAttention(nn.Module):
    """Linear attention over the pixels (softmax over keys first): [B, dim, H, W] -> [B, dim, H, W]."""

    def __init__(self, dim: int, heads: int = 4, dim_head: int = 32) -> None:
        super().__init__()
        self.heads = heads
        hidden_dim = dim_head * heads
        self.to_qkv = nn.Conv2d(dim, hidden_dim * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden_dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply linear attention."""
        b, c, h, w = x.shape
        q, k, v = rearrange(self.to_qkv(x), "b (qkv heads c) h w -> qkv b heads c (h w)", heads=self.heads, qkv=3)
        context = torch.einsum("bhdn,bhen->bhde", k.softmax(dim=-1), v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(rearrange(out, "b heads c (h w) -> b (heads c) h w", heads=self.heads, h=h, w=w))

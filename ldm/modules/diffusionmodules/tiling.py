"""Tiled application of the autoencoder: overlapping tiles, linearly blended, to bound peak memory.

A latent (or image) is cut into ``tile x tile`` windows that overlap by at least ``overlap`` cells; each window is
decoded (or encoded) on its own and the results are summed with weights that ramp linearly across every overlap
(and stay 1 elsewhere), then divided by the summed weights. The peak memory is that of one tile plus the output.

The approximation: every tile is processed without its surroundings. Its mid-block attention attends within the
tile only, its GroupNorm statistics are the tile's own, and its convolutions see zero padding at the tile edges.
The linear blending hides the edge effects (a tile's border pixels get a weight near 0); the attention and
normalisation statistics make tiled results differ slightly from whole-image ones. A tile that covers the whole
input gives exactly the plain result.
"""
from __future__ import annotations

from typing import Callable

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of windows of ``tile`` cells covering ``length`` with at least ``overlap`` shared cells.

    Windows step by ``tile - overlap``; the last one is moved back to end exactly at ``length`` (so it may
    overlap its neighbour by more). A tile at least as long as ``length`` gives the single start 0.
    """
    check_tiling(tile, overlap)
    if tile >= length:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def check_tiling(tile: int, overlap: int) -> None:
    """Raise ValueError naming the fix when ``tile``/``overlap`` cannot tile anything."""
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"tile size must be a positive integer (latent cells), got {tile!r}")
    if not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be an integer in [0, tile size {tile}), got {overlap!r}; "
                         f"a quarter of the tile size is a good choice")


def ramp_weights(starts: list[int], index: int, tile: int, scale: int) -> torch.Tensor:
    """1-D blending weights [tile * scale] (float32) of window ``index``: linear ramps over its overlaps.

    The ramp into window k over its overlap with window k-1 is the mirror of window k-1's ramp out, so the two
    weights add up to 1 there (before normalisation); edges of the whole input are not ramped.
    """
    n = tile * scale
    weights = torch.ones(n, dtype=torch.float32)
    if index > 0:
        ramp = (starts[index - 1] + tile - starts[index]) * scale
        weights[:ramp] = torch.minimum(weights[:ramp], (torch.arange(ramp) + 0.5) / ramp)
    if index < len(starts) - 1:
        ramp = (starts[index] + tile - starts[index + 1]) * scale
        weights[n - ramp:] = torch.minimum(weights[n - ramp:], (torch.arange(ramp, 0, -1) - 0.5) / ramp)
    return weights


def tiled_apply(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, tile: int, overlap: int,
                in_scale: int = 1, out_scale: int = 1) -> torch.Tensor:
    """Apply ``fn`` window by window and blend: x [B, C, H, W] -> fn's output [B, C', H', W'].

    Tiles are laid on a grid of cells: a cell is ``in_scale`` input pixels and ``out_scale`` output pixels
    (decoding: 1 and the factor f; encoding: f and 1), so H = h * in_scale and H' = h * out_scale. ``tile`` and
    ``overlap`` count cells. When one tile covers the whole input the result is exactly ``fn(x)``.
    """
    check_tiling(tile, overlap)
    height, width = x.shape[-2:]
    if height % in_scale or width % in_scale:
        raise ValueError(f"tiling needs an input whose sides ({height}x{width}) are multiples of {in_scale}; "
                         f"resize it or turn tiling off")
    rows = tile_starts(height // in_scale, tile, overlap)
    cols = tile_starts(width // in_scale, tile, overlap)
    if len(rows) == 1 and len(cols) == 1:
        return fn(x)
    th, tw = min(tile, height // in_scale), min(tile, width // in_scale)
    out = weight_sum = None
    for i, top in enumerate(rows):
        wy = ramp_weights(rows, i, th, out_scale)
        for j, left in enumerate(cols):
            piece = fn(x[..., top * in_scale:(top + th) * in_scale, left * in_scale:(left + tw) * in_scale])
            if out is None:
                out = piece.new_zeros((*piece.shape[:-2], height // in_scale * out_scale,
                                       width // in_scale * out_scale), dtype=torch.float32)
                weight_sum = torch.zeros(out.shape[-2:], dtype=torch.float32, device=out.device)
            w = (wy[:, None] * ramp_weights(cols, j, tw, out_scale)[None, :]).to(out.device)
            window = (slice(top * out_scale, (top + th) * out_scale), slice(left * out_scale, (left + tw) * out_scale))
            out[(..., *window)] += piece.float() * w
            weight_sum[window] += w
            dtype = piece.dtype
            del piece
    return (out / weight_sum).to(dtype)

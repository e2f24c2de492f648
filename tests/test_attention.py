"""Attention kernels: every backend (SDPA, math, float32-softmax math, chunked) computes the same attention."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from ldm.modules.attention import (
    ATTENTION_BACKENDS,
    BasicTransformerBlock,
    CrossAttention,
    SpatialTransformer,
    attention,
    set_attention_backend,
)

LOCAL_BACKENDS = [("sdpa", None), ("math", None), ("math-fp32", None), ("sdpa", 5), ("math", 3), ("math-fp32", 7)]


def reference_attention(q, k, v, mask=None):
    """Plain float64 softmax attention."""
    q, k, v = q.double(), k.double(), v.double()
    sim = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        sim = sim.masked_fill(~mask, float("-inf"))
    return sim.softmax(-1) @ v


@pytest.mark.parametrize("backend,chunk", LOCAL_BACKENDS)
def test_backends_match_float64_reference(backend, chunk):
    q, k, v = torch.randn(2, 3, 17, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    out = attention(q, k, v, backend=backend, chunk_size=chunk)
    assert out.shape == (2, 3, 17, 8)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,chunk", LOCAL_BACKENDS)
def test_backends_agree_with_a_key_mask(backend, chunk):
    q, k, v = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)[:, None, None, :]
    out = attention(q, k, v, backend=backend, chunk_size=chunk, mask=mask)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_fp32_softmax_avoids_fp16_overflow():
    q = torch.full((1, 1, 4, 64), 40.0, dtype=torch.float16)  # q.k = 102400 > fp16 max 65504
    v = torch.randn(1, 1, 4, 64).half()
    stable = attention(q, q, v, backend="math-fp32")
    assert stable.dtype == torch.float16 and torch.isfinite(stable).all()
    torch.testing.assert_close(stable.float(), v.float().mean(dim=2, keepdim=True).expand_as(v), atol=2e-3, rtol=0)
    assert not torch.isfinite(attention(q, q, v, backend="math")).all()  # the overflow upcasting avoids


def test_cross_attention_module_backends_agree():
    attn = CrossAttention(query_dim=16, context_dim=12, heads=2, dim_head=8).eval()
    x, ctx = torch.randn(2, 10, 16), torch.randn(2, 7, 12)
    with torch.no_grad():
        outs = []
        for backend, chunk in LOCAL_BACKENDS:
            attn.set_backend(backend, chunk)
            outs.append(attn(x, ctx))
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-5)
    assert outs[0].shape == (2, 10, 16)


def test_unknown_backend_and_bad_chunk_are_clear_errors():
    model = SpatialTransformer(32, 2, 16, context_dim=8)
    with pytest.raises(ValueError, match="unknown attention backend 'flash3'.*sdpa"):
        set_attention_backend(model, "flash3")
    with pytest.raises(ValueError, match="chunk_size"):
        set_attention_backend(model, "sdpa", chunk_size=0)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is not None, reason="xformers is installed")
def test_xformers_without_install_is_a_clear_error():
    with pytest.raises(ImportError, match="xformers is not installed"):
        set_attention_backend(SpatialTransformer(32, 2, 16, context_dim=8), "xformers")


def test_set_attention_backend_reaches_every_attention_module():
    model = torch.nn.Sequential(SpatialTransformer(32, 2, 16, depth=2, context_dim=8),
                                SpatialTransformer(32, 4, 8, context_dim=8))
    assert set_attention_backend(model, "math-fp32", chunk_size=64) == 6  # 2 attentions per transformer block
    modules = [m for m in model.modules() if isinstance(m, CrossAttention)]
    assert all(m.attn_backend == "math-fp32" and m.attn_chunk_size == 64 for m in modules)
    assert "sdpa" in ATTENTION_BACKENDS and CrossAttention(8).attn_backend == "sdpa"  # default, per module


def test_transformer_block_keys_follow_the_original():
    block = BasicTransformerBlock(32, 2, 16, context_dim=24, disable_self_attn=True)
    shapes = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert shapes["ff.net.0.proj.weight"] == (256, 32)  # GEGLU: 2 x 4 x dim
    assert shapes["ff.net.2.weight"] == (32, 128)
    assert shapes["attn1.to_k.weight"] == (32, 24)  # self-attention disabled: attn1 also reads the context
    assert shapes["attn2.to_out.0.weight"] == (32, 32) and "attn2.to_out.0.bias" in shapes
    assert "attn1.to_q.bias" not in shapes and "norm3.weight" in shapes


def test_spatial_transformer_per_block_context_dims():
    st = SpatialTransformer(32, 2, 16, depth=2, context_dim=[8, 12], use_checkpoint=False)
    assert st.transformer_blocks[0].attn2.to_k.weight.shape == (32, 8)
    assert st.transformer_blocks[1].attn2.to_k.weight.shape == (32, 12)
    out = st(torch.randn(1, 32, 4, 6), context=[torch.randn(1, 3, 8), torch.randn(1, 5, 12)])
    assert out.shape == (1, 32, 4, 6)
    with pytest.raises(ValueError, match="depth 2"):
        SpatialTransformer(32, 2, 16, depth=2, context_dim=[8, 12, 16])

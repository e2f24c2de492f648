"""UNetModel: reference parity, real SD layouts, head rule, projections, checkpointing, dtypes."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.modules.attention import BasicTransformerBlock, CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, UNetModel, attention_heads
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config

V1 = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
          num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
          transformer_depth=1, context_dim=768, use_checkpoint=True, legacy=False)
V2 = {**{k: v for k, v in V1.items() if k != "num_heads"}, "num_head_channels": 64,
      "use_linear_in_transformer": True, "context_dim": 1024, "use_fp16": True}
TINY = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2, 1],
            num_res_blocks=1, channel_mult=[1, 2], num_heads=2, use_spatial_transformer=True, context_dim=16,
            use_checkpoint=False, legacy=False)


def tiny_unet(**overrides) -> UNetModel:
    """A tiny seeded UNet whose zero-initialised layers (out conv, proj_out, ...) are refilled, so all count."""
    net = UNetModel(**{**TINY, **overrides})
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return net


def run_reference_case(reference_dir, name):
    """Build the case's UNet as check.py does and return (outputs, expected, tolerances)."""
    spec = next(c for c in json.loads((reference_dir / "cases.json").read_text()) if c["name"] == name)
    net = instantiate_from_config(OmegaConf.load(reference_dir / spec["config"]))
    net.load_state_dict(load_file(str(reference_dir / spec["weights"])), strict=True)
    net = net.float().eval()
    io = load_file(str(reference_dir / spec["io"]))
    with torch.no_grad():
        got = {"out": net(io["x"], timesteps=io["timesteps"], context=io["context"]),
               "out_float_t": net(io["x"], timesteps=io["timesteps_float"], context=io["context"])}
    tol = {k: spec.get("tolerances", {}).get(k, {"atol": spec["atol"], "rtol": spec["rtol"]}) for k in got}
    return got, io, tol


@pytest.mark.parametrize("name", ["unet_v1", "unet_v2"])
def test_reference_case(reference_dir, name):
    got, io, tol = run_reference_case(reference_dir, name)
    for key, value in got.items():
        torch.testing.assert_close(value, io[key], atol=tol[key]["atol"], rtol=tol[key]["rtol"])


@pytest.mark.parametrize("params,layout_file", [(V1, "sd_v1_keys.json"), (V2, "sd_v2_keys.json")])
def test_real_layout_on_meta(reference_dir, params, layout_file):
    prefix = "model.diffusion_model."
    ref = json.loads((reference_dir / "layouts" / layout_file).read_text())
    want = {k[len(prefix):]: v[:2] for k, v in ref.items() if k.startswith(prefix)}
    with torch.device("meta"):
        net = UNetModel(**params)
    got = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in net.state_dict().items()}
    assert got == want


def test_head_rule():
    assert attention_heads(320, 8, -1, legacy=False, use_spatial_transformer=True) == (8, 40)
    assert attention_heads(640, -1, 64, legacy=False, use_spatial_transformer=True) == (10, 64)
    assert attention_heads(640, -1, 64, legacy=True, use_spatial_transformer=True) == (10, 64)
    assert attention_heads(96, 4, -1, legacy=True, use_spatial_transformer=False) == (4, -1)


@pytest.mark.parametrize("heads_arg,expected", [({"num_heads": 2}, [(2, 16), (2, 32)]),
                                                ({"num_head_channels": 16}, [(2, 16), (4, 16)])])
def test_num_heads_vs_num_head_channels(heads_arg, expected):
    params = {k: v for k, v in TINY.items() if k != "num_heads"} | heads_arg
    with torch.device("meta"):
        net = UNetModel(**params)
    found = {(m.heads, int(m.scale ** -2 + 0.5)) for m in net.input_blocks.modules() if isinstance(m, CrossAttention)}
    assert found == set(expected)


def test_legacy_attention_block_heads():
    params = {**TINY, "use_spatial_transformer": False, "context_dim": None, "num_heads": 4, "legacy": True}
    net = tiny_unet(**params)
    blocks = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    assert blocks and all(b.num_heads == 4 for b in blocks)
    assert net.state_dict()["input_blocks.1.1.qkv.weight"].shape == (96, 32, 1)
    assert net(torch.randn(1, 4, 8, 8), torch.tensor([3])).shape == (1, 4, 8, 8)


def test_linear_and_conv_projections_compute_the_same():
    conv = SpatialTransformer(32, 2, 16, context_dim=8, use_checkpoint=False)
    lin = SpatialTransformer(32, 2, 16, context_dim=8, use_linear=True, use_checkpoint=False)
    sd = conv.state_dict()
    assert sd["proj_in.weight"].shape == (32, 32, 1, 1) and lin.state_dict()["proj_in.weight"].shape == (32, 32)
    torch.nn.init.normal_(sd["proj_out.weight"])
    lin.load_state_dict({k: v.squeeze(-1).squeeze(-1) if k.startswith("proj_") else v for k, v in sd.items()})
    conv.load_state_dict(sd)
    x, ctx = torch.randn(2, 32, 3, 5), torch.randn(2, 4, 8)
    torch.testing.assert_close(lin(x, ctx), conv(x, ctx), atol=1e-5, rtol=1e-5)


def test_non_square_input_and_batch_independence():
    net = tiny_unet().eval()
    x, t, ctx = torch.randn(3, 4, 8, 12), torch.tensor([1, 500, 999]), torch.randn(3, 5, 16)
    with torch.no_grad():
        out = net(x, timesteps=t, context=ctx)
        single = net(x[1:2], timesteps=t[1:2], context=ctx[1:2])
    assert out.shape == (3, 4, 8, 12)
    torch.testing.assert_close(out[1:2], single, atol=1e-5, rtol=1e-5)


def test_int_and_float_timesteps_agree():
    net = tiny_unet().eval()
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor([7, 901]), ctx), net(x, torch.tensor([7.0, 901.0]), ctx))


def test_gradient_checkpointing_gives_the_same_gradients(monkeypatch):
    calls = []
    original = BasicTransformerBlock._forward
    monkeypatch.setattr(BasicTransformerBlock, "_forward", lambda self, *a: calls.append(1) or original(self, *a))
    plain = tiny_unet()
    ckpt = UNetModel(**{**TINY, "use_checkpoint": True})
    ckpt.load_state_dict(plain.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([10, 20]), torch.randn(2, 5, 16)
    grads = []
    for net in (plain, ckpt):
        net.zero_grad()
        net(x, t, ctx).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters()})
        calls.append("done")
    n_blocks = sum(isinstance(m, BasicTransformerBlock) for m in plain.modules())
    assert calls.index("done") == n_blocks and len(calls) == 3 * n_blocks + 2  # recomputed in backward
    assert grads[0].keys() == grads[1].keys()
    assert all(g.any() for g in grads[0].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_use_fp16_computes_in_the_weights_dtype():
    net16 = tiny_unet(use_fp16=True).eval()
    net32 = UNetModel(**TINY).eval()
    net32.load_state_dict(net16.state_dict())
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 5, 16)
    with torch.no_grad():
        out = net16(x, t, ctx)
        assert out.dtype == torch.float32 and net16.dtype == torch.float32
        torch.testing.assert_close(out, net32(x, t, ctx))
        bf16 = net32.to(torch.bfloat16)(x, t, ctx)
    assert bf16.dtype == torch.float32 and net32.dtype == torch.bfloat16
    torch.testing.assert_close(bf16, out, atol=0.1, rtol=0.1)


def test_class_conditional_label_embedding():
    net = tiny_unet(num_classes=3).eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 5]), torch.randn(2, 5, 16)
    with torch.no_grad():
        a, b = net(x, t, ctx, y=torch.tensor([0, 1])), net(x, t, ctx, y=torch.tensor([2, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, t, ctx)


def test_timestep_embedding_layout():
    t = torch.tensor([0, 3])
    emb = timestep_embedding(t, 7)
    assert emb.shape == (2, 7) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0]))  # cos first, zero pad column
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1, :3], torch.cos(3 * freqs))
    torch.testing.assert_close(emb[1, 3:6], torch.sin(3 * freqs))

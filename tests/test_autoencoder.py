"""AutoencoderKL and its Gaussian posterior: reference parity, real layouts, posterior maths, loading."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.attention import set_attention_backend
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

REAL = dict(embed_dim=4, lossconfig={"target": "torch.nn.Identity"},
            ddconfig=dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                          ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0))
TINY = dict(embed_dim=3, lossconfig={"target": "torch.nn.Identity"},
            ddconfig=dict(double_z=True, z_channels=3, resolution=16, in_channels=3, out_ch=3, ch=32,
                          ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[8], dropout=0.0))


def load_case(reference_dir, name):
    """(spec, model built and loaded as check.py does, io tensors) of a reference case."""
    spec = next(c for c in json.loads((reference_dir / "cases.json").read_text()) if c["name"] == name)
    model = instantiate_from_config(OmegaConf.load(reference_dir / spec["config"]))
    prefix = spec["weights_prefix"]
    sd = {k[len(prefix):]: v for k, v in load_file(str(reference_dir / spec["weights"])).items()
          if k.startswith(prefix)}
    model.load_state_dict(sd, strict=True)
    return spec, model.float().eval(), load_file(str(reference_dir / spec["io"]))


def test_reference_case(reference_dir):
    spec, ae, io = load_case(reference_dir, "autoencoder_kl")
    with torch.no_grad():
        post = ae.encode(io["x"])
        got = {"posterior_mean": post.mean, "posterior_logvar": post.logvar, "posterior_std": post.std,
               "posterior_mode": post.mode(), "posterior_kl": post.kl(), "decoded_mean": ae.decode(post.mean),
               "forward_mode": ae(io["x"], sample_posterior=False)[0]}
    for key, value in got.items():
        tol = spec.get("tolerances", {}).get(key, {"atol": spec["atol"], "rtol": spec["rtol"]})
        torch.testing.assert_close(value, io[key], atol=tol["atol"], rtol=tol["rtol"], msg=key)


@pytest.mark.parametrize("layout_file", ["sd_v1_keys.json", "sd_v2_keys.json"])
def test_real_layout_on_meta(reference_dir, layout_file):
    prefix = "first_stage_model."
    ref = json.loads((reference_dir / "layouts" / layout_file).read_text())
    want = {k[len(prefix):]: v[:2] for k, v in ref.items() if k.startswith(prefix)}
    with torch.device("meta"):
        ae = AutoencoderKL(**REAL)
    got = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in ae.state_dict().items()}
    assert got == want


def test_posterior_statistics():
    moments = torch.randn(2, 8, 3, 5) * 3
    moments[0, 4:] = 100.0  # logvar beyond the clamp
    post = DiagonalGaussianDistribution(moments)
    assert torch.equal(post.mode(), post.mean) and torch.equal(post.mean, moments[:, :4])
    assert post.logvar.max() == 20.0 and torch.allclose(post.std, torch.exp(0.5 * post.logvar))
    kl = post.kl()
    assert kl.shape == (2,) and (kl >= 0).all()
    assert DiagonalGaussianDistribution(torch.zeros(1, 8, 2, 2)).kl().item() == 0.0  # N(0, 1) itself
    other = DiagonalGaussianDistribution(torch.cat([torch.zeros(2, 4, 3, 5), torch.zeros(2, 4, 3, 5)], dim=1))
    torch.testing.assert_close(post.kl(other), kl)
    x = torch.randn(2, 4, 3, 5)
    want = -torch.distributions.Normal(post.mean, post.std).log_prob(x).sum(dim=[1, 2, 3])
    torch.testing.assert_close(post.nll(x), want)


def test_sample_is_one_randn_draw(monkeypatch):
    post = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4, dtype=torch.float64))
    calls = []
    randn = torch.randn

    def counting_randn(*args, **kwargs):
        calls.append(args)
        return torch.full(tuple(args[0]), 0.5)

    monkeypatch.setattr(torch, "randn", counting_randn)
    sample = post.sample()
    monkeypatch.setattr(torch, "randn", randn)
    assert len(calls) == 1 and tuple(calls[0][0]) == (2, 4, 4, 4)
    assert sample.dtype == torch.float64
    torch.testing.assert_close(sample, post.mean + 0.5 * post.std)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    torch.testing.assert_close(post.sample(generator=g1), post.sample(generator=g2))


def test_deterministic_posterior():
    post = DiagonalGaussianDistribution(torch.randn(1, 6, 2, 2), deterministic=True)
    assert torch.equal(post.sample(), post.mean) and post.kl().item() == 0.0


def test_encode_decode_shapes_and_forward():
    ae = AutoencoderKL(**TINY).eval()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        post = ae.encode(x)
        assert post.mean.shape == (2, 3, 8, 12)
        assert ae.decode(post.mean).shape == x.shape
        dec, post2 = ae(x, sample_posterior=False)
        torch.testing.assert_close(dec, ae.decode(post.mode()))
        sampled, _ = ae(x)
    assert not torch.allclose(sampled, dec) and ae.get_last_layer() is ae.decoder.conv_out.weight


def test_attention_backend_reaches_the_attn_blocks():
    ae = AutoencoderKL(**TINY).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = ae(x, sample_posterior=False)[0]
        assert set_attention_backend(ae, "math-fp32", chunk_size=5) == 5  # enc: 1 + mid, dec: 2 + mid
        torch.testing.assert_close(ae(x, sample_posterior=False)[0], ref, atol=1e-5, rtol=1e-5)


def test_get_input_is_nchw_float():
    ae = AutoencoderKL(**TINY)
    batch = {"image": torch.rand(2, 16, 8, 3, dtype=torch.float64)}
    x = ae.get_input(batch, "image")
    assert x.shape == (2, 3, 16, 8) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x[1, 2], batch["image"][1, :, :, 2].float())


def test_ckpt_path_loads_a_full_checkpoint(tmp_path):
    src = AutoencoderKL(**TINY)
    path = tmp_path / "model.safetensors"
    save_file({"first_stage_model." + k: v.contiguous() for k, v in src.state_dict().items()}
              | {"model.diffusion_model.out.0.weight": torch.zeros(3)}, str(path))
    ae = AutoencoderKL(**TINY, ckpt_path=str(path))
    for k, v in src.state_dict().items():
        assert torch.equal(ae.state_dict()[k], v), k
    partial = tmp_path / "partial.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items() if not k.startswith("decoder.")}, str(partial))
    with pytest.raises(RuntimeError, match="lacks"):
        AutoencoderKL(**TINY, ckpt_path=str(partial))


def test_double_z_is_required():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL(**{**TINY, "ddconfig": {**TINY["ddconfig"], "double_z": False}})

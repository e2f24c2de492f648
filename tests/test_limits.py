"""Issue 13, parts 4, 5 and 8 from the working side: every multiple of the factor generates, 16-bit inputs keep
their tones, limits refuse only what cannot fit (and --allow_large overrides them), damaged weights are named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.checkpoint import damaged_tensors, mismatch_message
from ldm.inference import limits, pipeline, run
from ldm.inference.args import parse_options
from ldm.inference.errors import UsageError
from ldm.modules.diffusionmodules.openaimodel import Upsample, UNetModel
from ldm.modules.diffusionmodules.util import timestep_embedding
from tiny_model import load_script, model_args, samples, write_tiny_model

txt2img = load_script("txt2img")
img2img = load_script("img2img")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _unet(**overrides) -> UNetModel:
    torch.manual_seed(0)
    net = UNetModel(image_size=8, in_channels=4, out_channels=4, model_channels=64, attention_resolutions=[4],
                    num_res_blocks=1, channel_mult=[1, 2, 2, 2], num_heads=2, use_spatial_transformer=True,
                    context_dim=8, legacy=False, **overrides)
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0.0, 0.05)
    return net.eval()


@pytest.mark.parametrize("h,w", [(1, 1), (2, 3), (5, 7), (33, 32), (9, 16)])
def test_unet_runs_at_every_latent_size(h, w):
    """An SD-like 4-level UNet (needs multiples of 8 in the original) takes any latent size (any multiple of 8 px)."""
    net = _unet()
    x = torch.randn(1, 4, h, w)
    with torch.no_grad():
        out = net(x, torch.tensor([10]), context=torch.randn(1, 3, 8))
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_numbers_are_unchanged_where_the_original_works():
    """At sizes the original handles the skip sizes are exact doubles: output_size changes nothing, bit for bit."""
    up = Upsample(4, use_conv=True)
    x = torch.randn(2, 4, 5, 6)
    assert torch.equal(up(x), up(x, (10, 12)))
    assert up(x, (9, 11)).shape == (2, 4, 9, 11)
    net = _unet()
    x, t, c = torch.randn(1, 4, 16, 24), torch.tensor([500]), torch.randn(1, 3, 8)
    with torch.no_grad():
        hs, h = [], x
        emb = net.time_embed(timestep_embedding(t, net.model_channels))
        for m in net.input_blocks:
            h = m(h, emb, c)
            hs.append(h)
        h = net.middle_block(h, emb, c)
        for m in net.output_blocks:  # the original's loop: cat, then the block with plain 2x upsampling
            h = m(torch.cat([h, hs.pop()], dim=1), emb, c)
        expected = net.out(h)
        assert torch.equal(net(x, t, context=c), expected)


@pytest.mark.parametrize("size", [("--W", "6"), ("--H", "10"), ("--W", "2")])
def test_txt2img_sizes_that_crashed_now_work(tiny, tmp_path, size):
    """Tiny model: factor 2 and one UNet downsampling; 6, 10 and 2 pixels are multiples of 2 but not of 4."""
    out = tmp_path / "out"
    argv = [*model_args(tiny, steps=1), "--outdir", str(out), "--n_samples", "1", "--n_iter", "1", "--skip_grid",
            *size]
    assert txt2img.main(argv) == 0
    (image,) = samples(out)
    with Image.open(image) as im:
        assert im.size[0 if size[0] == "--W" else 1] == int(size[1])


def test_img2img_init_image_with_an_odd_latent_size(tiny, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 34, 3), dtype=np.uint8)).save(init)
    out = tmp_path / "out"
    assert img2img.main([*model_args(tiny, steps=2), "--init-img", str(init), "--outdir", str(out), "--n_samples",
                         "1", "--skip_grid"]) == 0
    with Image.open(samples(out)[0]) as im:
        assert im.size == (34, 32)


def _gradient16(width: int = 16, height: int = 8) -> np.ndarray:
    return (np.arange(width * height, dtype=np.uint32).reshape(height, width) * 65535 // (width * height - 1))


@pytest.mark.parametrize("mode", ["I;16", "I"])
def test_16_bit_grey_png_keeps_its_tones(tmp_path, mode):
    values = _gradient16()
    if mode == "I;16":  # a 16-bit grey PNG
        path = tmp_path / "grey16.png"
        Image.fromarray(values.astype(np.uint16)).save(path)
    else:  # 32-bit integer grey (TIFF) holding 16-bit values
        path = tmp_path / "grey32.tiff"
        Image.fromarray(values.astype(np.int32)).save(path)
    with Image.open(path) as check:
        assert check.mode == mode
    rgb = np.asarray(pipeline.load_init_image(path, 2)).astype(int)
    expected = np.rint(values / 257.0).astype(int)
    assert rgb.shape == (8, 16, 3)
    assert np.abs(rgb[..., 0] - expected).max() <= 1 and (rgb[..., 0] == rgb[..., 2]).all()
    assert (rgb == 255).mean() < 0.05  # was 99.6% white


def test_float_and_8_bit_images_are_scaled_right(tmp_path):
    grey = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(grey, mode="F").save(tmp_path / "f.tiff")
    rgb = np.asarray(pipeline.load_init_image(tmp_path / "f.tiff", 2))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and 120 <= rgb[4, 0, 0] <= 135
    Image.fromarray(np.full((8, 8), 77, np.int32)).save(tmp_path / "small-i.tiff")  # mode I, 8-bit values
    assert (np.asarray(pipeline.load_init_image(tmp_path / "small-i.tiff", 2)) == 77).all()


def test_decode_nan_is_an_error_with_a_hint():
    class AlwaysNaN(torch.nn.Module):
        def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
            return torch.full((z.shape[0], 3, 4, 4), float("nan"))

    with pytest.raises(limits.NonFiniteResult, match="NaN/inf.*no picture was saved"):
        pipeline.decode(AlwaysNaN(), torch.zeros(1, 4, 2, 2), pipeline.Precision("cpu"))
    with pytest.raises(limits.NonFiniteResult, match="--precision full"):
        limits.check_finite(torch.tensor([float("inf")]), "latents", reduced=True)


def test_memory_estimate_grows_with_batch_and_size():
    from omegaconf import OmegaConf

    from tiny_model import ROOT
    config = OmegaConf.load(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")
    one = limits.estimate_bytes(config, 8, 512, 512, 1, True)
    assert limits.estimate_bytes(config, 8, 512, 512, 4, True) == 4 * one
    assert limits.estimate_bytes(config, 8, 1024, 1024, 1, True) == pytest.approx(4 * one, rel=0.01)
    assert 0.5 * 2 ** 30 < one < 4 * 2 ** 30  # SD 1 at 512x512, float32: about a GiB of activations
    assert limits.estimate_bytes(config, 8, 2048, 2048, 1, True, tile=64) < \
        limits.estimate_bytes(config, 8, 2048, 2048, 1, True)


def _plan(tiny, tmp_path, *extra: str) -> run.Plan:
    return run.plan(parse_options([*model_args(tiny), "--outdir", str(tmp_path / "out"), *extra], "txt2img"))


def test_limits_refuse_and_allow_large_overrides(tiny, tmp_path, monkeypatch):
    for extra, words in ((["--H", "20000"], "at most 16384"), (["--n_samples", "10001", "--n_iter", "1"],
                                                              "more than 10000")):
        with pytest.raises(UsageError, match=words):
            _plan(tiny, tmp_path, *extra)
        assert _plan(tiny, tmp_path, *extra, "--allow_large").opts.allow_large
    monkeypatch.setattr(limits, "available_bytes", lambda device: 2 ** 20)  # 1 MiB free
    with pytest.raises(UsageError, match=r"needs about .* GiB, but cpu has 0\.0 GiB free.*--allow_large"):
        _plan(tiny, tmp_path, "--n_samples", "64")
    assert _plan(tiny, tmp_path, "--n_samples", "64", "--allow_large").width == 32
    assert not (tmp_path / "out").exists()


def test_damaged_and_mismatched_weights_are_named_in_one_line():
    model_sd = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(3), "c.bias": torch.zeros(1),
                "pos": torch.zeros(2, dtype=torch.long)}
    sd = {"a.weight": torch.zeros(2, 2, dtype=torch.int8), "b.weight": torch.tensor([0.0, float("nan"), 1.0]),
          "c.bias": torch.zeros(1, dtype=torch.float16), "pos": torch.zeros(2, dtype=torch.long)}
    msg = damaged_tensors(model_sd, sd, "checkpoint 'x'")
    assert "a.weight (int8)" in msg and "1 tensors hold NaN/inf values (first: b.weight)" in msg
    assert "c.bias" not in msg and "pos" not in msg and "\n" not in msg
    assert mismatch_message(model_sd, sd) == damaged_tensors(model_sd, sd)
    ok = {"a.weight": torch.ones(2, 2), "b.weight": torch.ones(3), "c.bias": torch.ones(1, dtype=torch.bfloat16),
          "pos": torch.zeros(2, dtype=torch.long)}
    assert mismatch_message(model_sd, ok) is None
    wrong = {**ok, "extra": torch.zeros(1)}
    del wrong["b.weight"]
    line = mismatch_message(model_sd, wrong, "checkpoint 'x'")
    assert "\n" not in line and "1 missing keys (first: b.weight)" in line and "1 unexpected keys" in line

"""Tiled VAE encoding/decoding: window layout, blending weights, exactness, closeness, seams, memory on GPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.tiling import ramp_weights, tile_starts, tiled_apply


def small_vae(attention: bool = False, seed: int = 0) -> AutoencoderKL:
    """A small random KL autoencoder with factor 4 (mid-block attention only when asked)."""
    torch.manual_seed(seed)
    ddconfig = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0, attn_type="vanilla" if attention else "none")
    return AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4).eval()


@pytest.mark.parametrize("length,tile,overlap", [(32, 16, 4), (37, 16, 4), (10, 16, 4), (16, 16, 0), (50, 9, 8)])
def test_windows_cover_everything_with_the_overlap(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    covered = torch.zeros(length, dtype=torch.bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered.all()
    if tile >= length:
        assert starts == [0]
    else:
        assert starts[-1] == length - tile
        assert all(a + tile - b >= overlap for a, b in zip(starts, starts[1:]))


def test_ramps_of_neighbours_add_up_to_one_and_edges_are_not_ramped():
    starts = tile_starts(40, 16, 4)  # [0, 12, 24]
    w = [ramp_weights(starts, k, 16, 2) for k in range(3)]
    assert bool((w[0][:24] == 1).all()) and bool((w[2][-24:] == 1).all())
    assert torch.allclose(w[0][24:] + w[1][:8], torch.ones(8))
    assert bool((w[1] > 0).all()) and float(w[1].min()) < 0.1


@pytest.mark.parametrize("shape,tile,overlap", [((2, 3, 13, 22), 8, 3), ((1, 2, 9, 9), 4, 0), ((1, 1, 5, 30), 6, 5)])
def test_a_pointwise_function_is_reproduced_exactly(shape, tile, overlap):
    """Blending bookkeeping: for a function without spatial context, tiles must give the plain result."""
    mix = torch.randn(5, shape[1], 1, 1)
    fn = lambda x: F.conv2d(F.interpolate(x, scale_factor=4, mode="nearest"), mix)  # noqa: E731
    x = torch.randn(shape)
    torch.testing.assert_close(tiled_apply(fn, x, tile, overlap, out_scale=4), fn(x), rtol=1e-5, atol=1e-5)
    pool = lambda x: F.avg_pool2d(x, 4)  # noqa: E731  (the encoding direction: 4 pixels per cell)
    image = torch.randn(shape[0], shape[1], shape[2] * 4, shape[3] * 4)
    torch.testing.assert_close(tiled_apply(pool, image, tile, overlap, in_scale=4), pool(image))


def test_blending_removes_the_seams_of_per_tile_statistics():
    """Subtracting each tile's mean (as a per-tile GroupNorm does) on a smooth ramp: hard seams vs blended."""
    fn = lambda x: x - x.mean()  # noqa: E731
    x = torch.linspace(0, 4, 48).repeat(48, 1)[None, None]
    blended = tiled_apply(fn, x, 16, 8)
    hard = torch.empty_like(x)
    for left in tile_starts(48, 16, 8):
        hard[..., left:left + 16] = fn(x[..., left:left + 16])
    step = 4 / 47

    def max_jump(y: torch.Tensor) -> float:
        return float((y[..., 1:] - y[..., :-1]).abs().max())
    # Neighbouring tiles' means differ by 8 steps (their stride): a hard seam jumps by about that much, the ramp
    # spreads it over the 8 overlapping columns (about one extra step per column).
    assert max_jump(hard) > 6 * step
    assert max_jump(blended) < 2.2 * step


def test_decode_with_one_tile_covering_the_latent_is_exact():
    vae = small_vae(attention=True)
    z = torch.randn(2, 4, 8, 12)
    with torch.no_grad():
        plain = vae.decode(z)
        assert plain.shape == (2, 3, 32, 48)
        assert torch.equal(vae.decode(z, tile_size=12), plain)
        vae.enable_tiling(tile_size=16)
        assert torch.equal(vae.decode(z), plain)
        image = torch.randn(1, 3, 32, 48)
        assert torch.equal(vae.encode(image).mean, vae.encode(image, tile_size=64).mean)
        vae.disable_tiling()
        assert torch.equal(vae.encode(image).mean, vae.quant_conv(vae.encoder(image)).chunk(2, dim=1)[0])
    assert vae.tile_size is None and "tile_size" not in vae.state_dict()


def test_tiled_decode_and_encode_are_close_without_attention():
    """Real tiles on a conv-only random VAE: the differences come from zero padding at the tile edges (which the
    blending hides) and per-tile GroupNorm statistics (which it cannot); random weights exaggerate both."""
    vae = small_vae(attention=False)
    z = torch.randn(1, 4, 24, 20)
    with torch.no_grad():
        plain, tiled = vae.decode(z), vae.decode(z, tile_size=16, tile_overlap=8)
        hard = torch.empty_like(plain)  # the same tiles pasted without blending
        for top in tile_starts(24, 16, 8):
            for left in tile_starts(20, 16, 8):
                hard[..., top * 4:(top + 16) * 4, left * 4:(left + 16) * 4] = vae.decode(
                    z[..., top:top + 16, left:left + 16])
        image = torch.rand(1, 3, 96, 80) * 2 - 1
        moments_plain, moments_tiled = vae.encode(image).mean, vae.encode(image, tile_size=16, tile_overlap=8).mean
    err, err_hard, scale = (tiled - plain).abs(), (hard - plain).abs(), float(plain.std())
    assert tiled.shape == plain.shape and torch.isfinite(tiled).all()
    assert float(err.mean()) < 0.2 * scale and float(err.max()) < 2.5 * scale
    assert float(err.mean()) < 0.7 * float(err_hard.mean())
    assert float((moments_tiled - moments_plain).abs().mean()) < 0.12 * float(moments_plain.std())


def test_tiled_decode_shows_no_seam():
    """Column-to-column jumps of the tiled image stay as small as the plain image's everywhere."""
    vae = small_vae(attention=False, seed=1)
    z = F.interpolate(torch.randn(1, 4, 6, 6), size=(16, 32), mode="bilinear")  # smooth latent, smooth image
    with torch.no_grad():
        plain, tiled = vae.decode(z), vae.decode(z, tile_size=12, tile_overlap=4)

    def jumps(x: torch.Tensor) -> torch.Tensor:
        return (x[..., 1:] - x[..., :-1]).abs().mean(dim=(0, 1, 2))
    assert float(jumps(tiled).max()) < 1.5 * float(jumps(plain).max())


def test_tiled_decode_with_attention_runs_and_keeps_dtype():
    vae = small_vae(attention=True).to(torch.bfloat16)
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 4, 20, 20, dtype=torch.bfloat16), tile_size=8)
    assert out.shape == (1, 3, 80, 80) and out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_bad_tiling_is_refused_with_a_clear_message():
    vae = small_vae()
    with pytest.raises(ValueError, match="overlap"):
        vae.enable_tiling(tile_size=8, overlap=8)
    with pytest.raises(ValueError, match="positive integer"):
        vae.decode(torch.randn(1, 4, 8, 8), tile_size=0)
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(torch.randn(1, 3, 30, 32), tile_size=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_2048_decode_fits_in_8_gb_on_gpu():
    """The real SD VAE decodes a 256x256 latent (2048x2048 image) in fp16 tiles under 8 GiB of GPU memory."""
    ddconfig = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128, ch_mult=[1, 2, 4, 4],
                    num_res_blocks=2, attn_resolutions=[], dropout=0.0)
    vae = AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)
    vae = vae.to("cuda", torch.float16).eval()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = vae.decode(torch.randn(1, 4, 256, 256, device="cuda", dtype=torch.float16), tile_size=64)
    torch.cuda.synchronize()
    assert out.shape == (1, 3, 2048, 2048)
    assert torch.cuda.max_memory_allocated() < 8 * 2 ** 30

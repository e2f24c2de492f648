"""benchmarks/bench.py: options, FLOP counting at the real sizes, the table, the default-model line, VAE memory."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny_model import ROOT, write_tiny_model

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench  # noqa: E402
import contenders  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine, 2 threads can be many times slower than 1."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cpu_defaults_are_the_reduced_fp32_set():
    args = bench.parse_args(["--device", "cpu"])
    assert args.dtype is torch.float32 and (args.width_div, args.vae_div, args.latent_div) == (5, 4, 2)
    assert (args.warmup, args.iters, args.e2e_iters) == (1, 3, 1) and args.only == list(bench.COMPONENTS)
    full = bench.parse_args(["--device", "cpu", "--full-size", "--only", "vae,unet1", "--dtype", "bf16"])
    assert (full.width_div, full.latent_div, full.dtype, full.only) == (1, 1, torch.bfloat16, ["vae", "unet1"])


@pytest.mark.parametrize("flags,message", [(["--compile", "default"], "CUDA devices"),
                                           (["--cuda-graphs"], "CUDA devices"),
                                           (["--only", "unet3"], "unknown components"),
                                           (["--sampler", "DPM++ 2N"], "unknown sampler")])
def test_bad_options_are_refused(flags, message, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name,latent,context,gflop", [("v1-inference", 64, 768, 1606.5),
                                                        ("v2-inference", 96, 1024, 4298.2)])
def test_flops_of_the_real_unets_match_the_published_counts(name, latent, context, gflop):
    """Counted on the meta device (no memory, no time): the anchors of issue 6 (1,606 and 4,298 GFLOP)."""
    params = contenders.sd_params(name, bench.parse_args(["--device", "cpu", "--full-size"]))
    with torch.device("meta"):
        unet = bench.instantiate_from_config(params.unet_config)
        x, c = torch.randn(2, 4, latent, latent), torch.randn(2, 77, context)
        flops, out = bench.count_flops(lambda: unet(x, torch.tensor([1, 1]), context=c))
    assert out.shape == x.shape and flops / 1e9 == pytest.approx(gflop, abs=0.1)


def test_vae_decode_flops_match_the_published_count():
    params = contenders.sd_params("v1-inference", bench.parse_args(["--device", "cpu", "--full-size"]))
    with torch.device("meta"):
        vae = bench.instantiate_from_config(params.first_stage_config)
        flops, image = bench.count_flops(lambda: vae.decode(torch.randn(1, 4, 64, 64)))
    assert image.shape == (1, 3, 512, 512) and flops / 1e9 == pytest.approx(2514.5, abs=0.1)


def test_diffusers_contenders_have_our_architecture():
    pytest.importorskip("diffusers")
    args = bench.parse_args(["--device", "cpu", "--full-size"])
    for name in ("v1-inference", "v2-inference"):
        params = contenders.sd_params(name, args)
        with torch.device("meta"):
            ours = bench.instantiate_from_config(params.unet_config)
            theirs = contenders.diffusers_unet(params.unet_config.params)
            assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    with torch.device("meta"):
        ours = bench.instantiate_from_config(params.first_stage_config)
        theirs = contenders.diffusers_vae(params.first_stage_config.params.ddconfig)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


@pytest.mark.parametrize("sampler,scheduler", [("DDIM", "DDIMScheduler"),
                                               ("DPM++ 2M Karras", "DPMSolverMultistepScheduler"),
                                               ("Euler a", "EulerAncestralDiscreteScheduler"), ("LMS", None)])
def test_txt2img_line_runs_the_matching_diffusers_scheduler(sampler, scheduler):
    pytest.importorskip("diffusers")
    theirs = contenders.diffusers_scheduler(sampler)
    assert (type(theirs).__name__ if theirs is not None else None) == scheduler
    if sampler == "DPM++ 2M Karras":
        assert theirs.config.use_karras_sigmas and theirs.config.algorithm_type == "dpmsolver++"


def test_table_ratio_throughput_and_dashes():
    rows = [bench.Row("UNet", "ours", ms=10.0, p10=9.0, p90=11.0, flops=2e12, peak_mib=100.0, first_s=0.5, diff=0.0),
            bench.Row("UNet", "diffusers", ms=20.0, p10=19.0, p90=21.0, flops=2e12),
            bench.Row("default model", "ours", ms=5000.0, note="2 threads")]
    lines = bench.table(rows).splitlines()
    assert len(lines) == 5 and lines[0].startswith("| component | impl | ms (median)")
    ours = [cell.strip() for cell in lines[2].split("|")[1:-1]]
    assert ours[:6] == ["UNet", "ours", "10.0", "9.0–11.0", "200", "2000"] and ours[8] == "0.50"
    assert lines[4].count("—") >= 6 and "2 threads" in lines[4]


def test_reduced_unet_component_runs_and_compares_with_its_plain_output():
    args = bench.parse_args(["--device", "cpu", "--no-diffusers", "--iters", "1"])
    args.width_div, args.latent_div = 10, 8  # 32 channels, 8x8 latents: a fraction of a second
    rows = bench.bench_unet(args, "v1-inference", 64)
    assert [r.impl for r in rows] == ["ours"] and rows[0].component == "UNet SD1 8x8 b2"
    assert rows[0].ms > 0 and rows[0].flops > 0 and rows[0].diff == 0.0


def test_default_model_line_is_skipped_when_absent(tmp_path, caplog):
    args = bench.parse_args(["--device", "cpu", "--default-model", str(tmp_path / "missing")])
    assert bench.bench_default_model(args) == [] and "skipped" in caplog.text


@pytest.mark.slow
def test_default_model_line_times_three_images(tmp_path):
    config, weights = write_tiny_model(tmp_path, name="config")
    weights.rename(tmp_path / "model.safetensors")
    args = bench.parse_args(["--device", "cpu", "--default-model", str(tmp_path), "--threads", "1"])
    (row,) = bench.bench_default_model(args)
    assert row.component == "default model txt2img 3x32x32 50 steps" and row.ms > 0  # 16x16 latents, factor 2
    assert "1 threads" in row.note and "s per image" in row.note


@pytest.mark.slow
def test_vae_memory_mode_reports_plain_and_tiled_peaks():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench.py"), "--device", "cpu",
                          "--vae-memory", "8", "4", "--threads", "1"], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    lines = [line for line in out.splitlines() if line.startswith("| VAE decode 64x64 peak")]
    assert len(lines) == 2 and "ours plain" in lines[0] and "ours tiled 4" in lines[1]

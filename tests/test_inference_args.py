"""Flags of scripts/txt2img.py and scripts/img2img.py: both SD generations' spellings, defaults, validation."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ldm.inference.args import parse_options, read_prompts, resolve_sampler
from ldm.inference.errors import UsageError


def parse(*argv: str, mode: str = "txt2img"):
    return parse_options(list(argv), mode)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    from PIL import Image

    path = tmp_path / "in.png"
    Image.new("RGB", (8, 8)).save(path)
    return path


def test_defaults_are_the_originals():
    o = parse("--prompt", "x")
    assert (o.steps, o.sampler, o.eta, o.scale, o.seed, o.n_samples, o.n_iter) == (50, "ddim", None, 7.5, 42, 3, 2)
    assert o.n_rows == o.n_samples and o.precision == "autocast" and o.outdir == Path("outputs/txt2img-samples")
    assert o.height is None and o.width is None and o.latent_channels is None and o.factor is None
    assert o.ckpt is None and o.config is None and o.use_ema is None
    assert o.watermark and o.safety_check and o.negative_prompt == ""
    assert o.device == ("cuda" if torch.cuda.is_available() else "cpu")


def test_img2img_defaults(image: Path):
    o = parse("--init-img", str(image), mode="img2img")
    assert (o.n_samples, o.n_iter, o.scale, o.strength) == (2, 1, 5.0, 0.75)
    assert o.init_img == image and o.outdir == Path("outputs/img2img-samples")


@pytest.mark.parametrize("v1, v2", [
    (["--ddim_steps", "7"], ["--steps", "7"]),
    (["--dpm_solver"], ["--dpm"]),
    (["--negative_prompt", "n"], ["--negative-prompt", "n"]),
    (["--use_ema"], ["--ema"]),
    (["--no_ema"], ["--raw_weights"]),
])
def test_both_spellings_give_the_same_options(v1, v2):
    assert parse("--prompt", "x", *v1) == parse("--prompt", "x", *v2)


def test_init_img_spellings(image: Path):
    assert parse("--init-img", str(image), mode="img2img") == parse("--init_img", str(image), mode="img2img")


def test_from_file_spellings(tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text("a\nb\n")
    assert parse("--from-file", str(f)) == parse("--from_file", str(f))


def test_all_original_flags_are_accepted(tmp_path: Path):
    o = parse("--prompt", "x", "--outdir", str(tmp_path), "--plms", "--n_iter", "1", "--n_samples", "2",
              "--n_rows", "1", "--H", "64", "--W", "96", "--C", "4", "--f", "8", "--scale", "9", "--fixed_code",
              "--seed", "3", "--precision", "full", "--skip_grid", "--skip_save", "--device", "cpu", "--bf16",
              "--no_watermark", "--no_safety_check", "--watermark_text", "abc")
    assert (o.sampler, o.n_iter, o.n_samples, o.n_rows, o.height, o.width) == ("plms", 1, 2, 1, 64, 96)
    assert (o.latent_channels, o.factor, o.scale, o.seed, o.precision) == (4, 8, 9.0, 3, "full")
    assert o.fixed_code and o.skip_grid and o.skip_save and o.bf16 and not o.watermark and not o.safety_check
    assert o.outdir == tmp_path and o.device == "cpu" and o.watermark_text == "abc"


@pytest.mark.parametrize("argv, sampler, label, schedule", [
    ([], "ddim", "DDIM", "ddim"), (["--plms"], "plms", "PLMS", "ddim"),
    (["--dpm"], "dpm_solver", "DPM-Solver", "dpm_solver"), (["--sampler", "PLMS"], "plms", "PLMS", "ddim"),
    (["--sampler", "dpm_solver"], "dpm_solver", "DPM-Solver", "dpm_solver"),
    (["--sampler", "dpm", "--dpm"], "dpm_solver", "DPM-Solver", "dpm_solver"),
    (["--sampler", "DPM++ 2M Karras"], "dpmpp_2m", "DPM++ 2M", "karras"),
    (["--sampler", "dpm++ 2m sde exponential"], "dpmpp_2m_sde", "DPM++ 2M SDE", "exponential"),
    (["--sampler", "Euler a"], "euler_ancestral", "Euler a", "normal"),
    (["--sampler", "euler_ancestral", "--schedule", "karras"], "euler_ancestral", "Euler a", "karras"),
    (["--sampler", "DPM++ 2M Karras", "--schedule", "exponential"], "dpmpp_2m", "DPM++ 2M", "exponential"),
    (["--sampler", "UniPC", "--schedule", "uniform"], "unipc", "UniPC", "normal"),
    (["--sampler", "k_dpmpp_2m", "--schedule", "automatic"], "dpmpp_2m", "DPM++ 2M", "karras"),
])
def test_sampler_selection(argv, sampler, label, schedule):
    o = parse("--prompt", "x", *argv)
    assert (o.sampler, o.sampler_label, o.sampler_choice.schedule) == (sampler, label, schedule)


def test_resolve_sampler_refuses_conflicts_and_unknown_names():
    with pytest.raises(UsageError, match="conflicting"):
        resolve_sampler(None, plms=True, dpm=True)
    with pytest.raises(UsageError, match="conflicting"):
        resolve_sampler("ddim", plms=True, dpm=False)
    with pytest.raises(UsageError, match="unknown sampler 'eular a'; did you mean 'Euler a'"):
        resolve_sampler("eular a", plms=False, dpm=False)
    assert resolve_sampler("euler", plms=False, dpm=False).spec.name == "euler"


def test_sampler_help_lists_the_table(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse("--sampler", "help")
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert all(name in out for name in ("DPM++ 2M", "Euler a", "UniPC", "DDIM", "dpmpp_3m_sde", "karras"))


def test_unknown_sampler_exits_2_with_suggestions(capsys):
    from ldm.inference.cli import main

    assert main(["--prompt", "x", "--sampler", "DPM++ 2N Karras"], "txt2img") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown sampler" in err[0] and "'DPM++ 2M'" in err[0]


@pytest.mark.parametrize("argv, message", [
    (["--ddim_steps", "0"], "--ddim_steps/--steps must be at least 1"),
    (["--steps", "-3"], "at least 1"),
    (["--n_samples", "0"], "--n_samples must be at least 1"),
    (["--n_iter", "0"], "--n_iter must be at least 1"),
    (["--H", "0"], "--H must be at least 1"),
    (["--ddim_eta", "-0.5"], "--ddim_eta must be >= 0"),
    (["--scale", "nan"], "--scale must be a finite number"),
    (["--seed", "-1"], "--seed must be between"),
    (["--plms", "--ddim_eta", "0.5"], "only applies to samplers that add fresh noise"),
    (["--sampler", "DPM++ 2M", "--eta", "0.5"], "DPM++ 2M is deterministic"),
    (["--schedule", "linear"], "invalid choice"),
    (["--ddim_steps", "ten"], "invalid int value"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--precision", "half"], "invalid choice"),
    (["--prompt", "y"], "either --prompt or --from-file"),
    (["--repeat", "2"], "--repeat applies to --from-file"),
    (["--config", "c.yaml"], "without --ckpt"),
    (["--ckpt", "/nonexistent/model.ckpt"], "checkpoint '/nonexistent/model.ckpt' does not exist"),
    (["--vae", "/nonexistent/vae.pt"], "--vae: VAE '/nonexistent/vae.pt' does not exist"),
    (["--safety_checker", "/nonexistent/dir"], "folder '/nonexistent/dir' does not exist"),
    (["--device", "nonsense"], "invalid --device"),
])
def test_bad_flags_are_usage_errors(argv, message, tmp_path: Path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("a\n")
    base = ["--from-file", str(prompt_file)] if argv[0] == "--prompt" else ["--prompt", "x"]
    with pytest.raises(UsageError, match=re.escape(message)):
        parse(*base, *argv)


def test_empty_prompt_is_refused():
    with pytest.raises(UsageError, match="--prompt is empty"):
        parse("--prompt", "  ")


def test_outdir_that_is_a_file_is_refused(tmp_path: Path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        parse("--prompt", "x", "--outdir", str(f))


def test_safety_checker_contradiction(tmp_path: Path):
    with pytest.raises(UsageError, match="contradict"):
        parse("--prompt", "x", "--safety_checker", str(tmp_path), "--no_safety_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_gpu_is_refused():
    with pytest.raises(UsageError, match="no CUDA GPU is available: use --device cpu"):
        parse("--prompt", "x", "--device", "cuda")


@pytest.mark.parametrize("strength", ["-0.1", "1.01", "inf"])
def test_strength_outside_unit_interval(strength: str, image: Path):
    with pytest.raises(UsageError, match="--strength"):
        parse("--init-img", str(image), "--strength", strength, mode="img2img")


@pytest.mark.parametrize("strength", ["0", "1", "1.0", "0.3"])
def test_strength_bounds_are_allowed(strength: str, image: Path):
    assert parse("--init-img", str(image), "--strength", strength, mode="img2img").strength == float(strength)


def test_img2img_needs_an_image_and_takes_any_sampler(image: Path):
    with pytest.raises(UsageError, match="--init-img PATH"):
        parse(mode="img2img")
    assert parse("--init-img", str(image), "--plms", mode="img2img").sampler == "plms"
    assert parse("--init-img", str(image), "--sampler", "Euler a", mode="img2img").sampler == "euler_ancestral"
    with pytest.raises(UsageError, match="image '/nonexistent.png' does not exist"):
        parse("--init-img", "/nonexistent.png", mode="img2img")


def test_txt2img_has_no_img2img_flags():
    with pytest.raises(UsageError, match="unrecognized arguments"):
        parse("--prompt", "x", "--strength", "0.5")


def test_read_prompts(tmp_path: Path):
    f = tmp_path / "p.txt"
    f.write_text("  first  \n\n\tsecond\n   \n", encoding="utf-8")
    assert read_prompts(f) == ["first", "second"]


@pytest.mark.parametrize("content, message", [(b"", "contains no prompts"), (b"\n  \n", "contains no prompts"),
                                              (b"\xff\xfe\x00bad", "not UTF-8 text")])
def test_read_prompts_errors(tmp_path: Path, content: bytes, message: str):
    f = tmp_path / "p.txt"
    f.write_bytes(content)
    with pytest.raises(UsageError, match=message):
        read_prompts(f)


def test_help_lists_both_spellings(capsys):
    from ldm.inference.args import build_parser

    text = build_parser("img2img").format_help()
    for flag in ("--ddim_steps", "--steps", "--dpm_solver", "--dpm", "--init-img", "--strength", "--from-file",
                 "--negative_prompt", "--sampler", "--vae", "--no_watermark", "--no_safety_check", "--repeat"):
        assert flag in text

"""scripts/txt2img.py end to end with a tiny random model on the CPU: outputs, metadata, seeds, samplers, errors."""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.inference import loading
from ldm.inference.metadata import file_hash, parse_parameters
from ldm.inference.outputs import read_parameters
from tiny_model import PIXELS, ROOT, assert_same_image, load_script, model_args, pixels, samples, write_tiny_model

txt2img = load_script("txt2img")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def generate(tiny, outdir: Path, *extra: str) -> int:
    return txt2img.main([*model_args(tiny), "--outdir", str(outdir), *extra])


def test_end_to_end_layout_and_metadata(tiny, tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert generate(tiny, out, "--prompt", "a red circle", "--n_samples", "2", "--n_iter", "2", "--seed", "7",
                    "--negative_prompt", "blue") == 0
    files = samples(out)
    assert [f.name for f in files] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert [p.name for p in out.glob("grid-*.png")] == ["grid-0000.png"]
    with Image.open(out / "grid-0000.png") as grid:
        assert grid.size == (2 * (PIXELS + 2) + 2, 2 * (PIXELS + 2) + 2)
    for k, f in enumerate(files):
        with Image.open(f) as image:
            assert image.size == (PIXELS, PIXELS)
        meta = parse_parameters(read_parameters(f))
        assert meta["Prompt"] == "a red circle" and meta["Negative prompt"] == "blue"
        assert (meta["Seed"], meta["Steps"], meta["Sampler"], meta["CFG scale"]) == (str(7 + k), "2", "DDIM", "7.5")
        assert meta["Size"] == f"{PIXELS}x{PIXELS}" and meta["Model"] == "tiny"
        assert meta["Model hash"] == file_hash(tiny[1])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"Done: 4 images in {out / 'samples'}, grid {out / 'grid-0000.png'}")
    assert last.endswith("s per image")


def test_same_seed_same_pixels_and_each_image_alone(tiny, tmp_path: Path):
    args = ["--prompt", "a square", "--n_samples", "3", "--n_iter", "1", "--skip_grid", "--seed", "100"]
    assert generate(tiny, tmp_path / "a", *args) == 0
    assert generate(tiny, tmp_path / "b", *args) == 0
    first, second = samples(tmp_path / "a"), samples(tmp_path / "b")
    for x, y in zip(first, second):
        np.testing.assert_array_equal(pixels(x), pixels(y))
    assert not np.array_equal(pixels(first[0]), pixels(first[1]))  # different seeds, different images
    seed = int(parse_parameters(read_parameters(first[2]))["Seed"])
    assert generate(tiny, tmp_path / "alone", "--prompt", "a square", "--n_samples", "1", "--n_iter", "1",
                    "--skip_grid", "--seed", str(seed)) == 0
    assert_same_image(pixels(samples(tmp_path / "alone")[0]), pixels(first[2]))


def test_stochastic_ddim_images_depend_on_their_own_seed_only(tiny, tmp_path: Path):
    args = ["--prompt", "p", "--ddim_eta", "1.0", "--n_iter", "1", "--skip_grid"]
    assert generate(tiny, tmp_path / "batch", *args, "--n_samples", "2", "--seed", "5") == 0
    assert generate(tiny, tmp_path / "alone", *args, "--n_samples", "1", "--seed", "6") == 0
    batch, alone = samples(tmp_path / "batch"), samples(tmp_path / "alone")
    assert parse_parameters(read_parameters(batch[1]))["Eta DDIM"] == "1"
    assert_same_image(pixels(batch[1]), pixels(alone[0]))


def test_fixed_code_reuses_the_start_noise(tiny, tmp_path: Path):
    assert generate(tiny, tmp_path, "--prompt", "p", "--fixed_code", "--n_samples", "2", "--n_iter", "2",
                    "--skip_grid", "--seed", "3") == 0
    files = samples(tmp_path)
    assert [parse_parameters(read_parameters(f))["Seed"] for f in files] == ["3", "4", "3", "4"]
    np.testing.assert_array_equal(pixels(files[0]), pixels(files[2]))


@pytest.mark.parametrize("flag", ["--plms", "--dpm", "--dpm_solver", "--sampler=plms"])
def test_other_samplers(tiny, tmp_path: Path, flag: str):
    assert generate(tiny, tmp_path, "--prompt", "p", flag, "--n_samples", "1", "--n_iter", "1", "--skip_grid") == 0
    meta = parse_parameters(read_parameters(samples(tmp_path)[0]))
    assert meta["Sampler"] == ("PLMS" if "plms" in flag else "DPM++ 2M")


def test_from_file_with_a_smaller_last_batch_and_repeat(tiny, tmp_path: Path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\n\nsecond\nthird\n", encoding="utf-8")
    out = tmp_path / "out"
    assert generate(tiny, out, "--from-file", str(prompts), "--n_samples", "2", "--n_iter", "1") == 0
    metas = [parse_parameters(read_parameters(f)) for f in samples(out)]
    assert [m["Prompt"] for m in metas] == ["first", "second", "third"]
    assert [m["Seed"] for m in metas] == ["42", "43", "44"]
    out2 = tmp_path / "out2"
    assert generate(tiny, out2, "--from_file", str(prompts), "--repeat", "2", "--n_samples", "4", "--n_iter", "1",
                    "--skip_grid") == 0
    assert [parse_parameters(read_parameters(f))["Prompt"] for f in samples(out2)] == [
        "first", "first", "second", "second", "third", "third"]


def test_numbering_continues_and_never_overwrites(tiny, tmp_path: Path):
    (tmp_path / "samples").mkdir(parents=True)
    (tmp_path / "samples" / "00004.png").write_bytes(b"keep me")
    (tmp_path / "grid-0000.png").write_bytes(b"keep me too")
    for _ in range(2):
        assert generate(tiny, tmp_path, "--prompt", "p", "--n_samples", "1", "--n_iter", "1") == 0
    assert [f.name for f in samples(tmp_path)] == ["00004.png", "00005.png", "00006.png"]
    assert (tmp_path / "samples" / "00004.png").read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png",
                                                                    "grid-0002.png"]
    assert (tmp_path / "grid-0000.png").read_bytes() == b"keep me too"


def test_skip_save_and_skip_grid(tiny, tmp_path: Path):
    assert generate(tiny, tmp_path, "--prompt", "p", "--n_samples", "1", "--n_iter", "1", "--skip_save") == 0
    assert not (tmp_path / "samples").exists() and len(list(tmp_path.glob("grid-*.png"))) == 1


def test_negative_prompt_changes_the_image(tiny, tmp_path: Path):
    args = ["--prompt", "p", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--scale", "9"]
    assert generate(tiny, tmp_path / "a", *args) == 0
    assert generate(tiny, tmp_path / "b", *args, "--negative_prompt", "something else entirely") == 0
    assert not np.array_equal(pixels(samples(tmp_path / "a")[0]), pixels(samples(tmp_path / "b")[0]))


def test_long_prompt_warns_with_the_dropped_words(tiny, tmp_path: Path, caplog):
    prompt = " ".join(["red"] * 80) + " zebra giraffe"
    with caplog.at_level(logging.WARNING):
        assert generate(tiny, tmp_path, "--prompt", prompt, "--n_samples", "2", "--n_iter", "2") == 0
    warnings = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert len(warnings) == 1 and "zebra giraffe" in warnings[0] and "77" in warnings[0]


def test_default_model_is_used_without_flags(tiny, tmp_path: Path, monkeypatch):
    default = tmp_path / "sd-default"
    default.mkdir()
    shutil.copy(tiny[0], default / loading.DEFAULT_CONFIG_NAME)
    shutil.copy(tiny[1], default / loading.DEFAULT_WEIGHTS_NAME)
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", default)
    out = tmp_path / "out"
    assert txt2img.main(["--outdir", str(out), "--n_samples", "1", "--n_iter", "1", "--steps", "2",
                         "--no_safety_check"]) == 0
    meta = parse_parameters(read_parameters(samples(out)[0]))
    assert meta["Model"] == "sd-default" and meta["Prompt"] == loading.DEFAULT_MODEL_PROMPT


def test_missing_default_model_says_what_to_pass(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(loading, "DEFAULT_MODEL_DIR", tmp_path / "absent")
    assert txt2img.main(["--prompt", "p", "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the default model is missing" in err and "--ckpt PATH" in err and "--config PATH" in err
    assert not (tmp_path / "out").exists()


def test_config_beside_the_checkpoint_is_found(tiny, tmp_path: Path):
    out = tmp_path / "out"
    assert txt2img.main(["--ckpt", str(tiny[1]), "--outdir", str(out), "--prompt", "p", "--n_samples", "1",
                         "--n_iter", "1", "--steps", "2", "--no_safety_check"]) == 0
    assert len(samples(out)) == 1


def test_safety_checker_replaces_flagged_images(tiny, tmp_path: Path, reference_dir: Path, caplog):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(reference_dir / "safety_checker.weights.safetensors"))
    results = {}
    for name, threshold in (("strict", -10.0), ("lenient", 10.0)):
        folder = tmp_path / name
        folder.mkdir()
        for f in ("config.json", "preprocessor_config.json"):
            shutil.copy(reference_dir / "safety_checker" / f, folder / f)
        weights["concept_embeds_weights"] = torch.full((17,), threshold)
        save_file(weights, str(folder / "model.safetensors"))
        out = tmp_path / f"out-{name}"
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert txt2img.main([*model_args(tiny)[:4], "--safety_checker", str(folder), "--outdir", str(out),
                                 "--prompt", "p", "--n_samples", "2", "--n_iter", "1", "--steps", "2"]) == 0
        results[name] = ([pixels(f) for f in samples(out)], caplog.text)
    flagged, text = results["strict"]
    assert all(not image.any() for image in flagged) and "flagged by the safety checker" in text
    clean, text = results["lenient"]
    assert all(image.any() for image in clean) and "flagged" not in text


def test_absent_default_safety_checker_warns_once(tiny, tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setattr(loading, "DEFAULT_SAFETY_DIR", tmp_path / "no-checker")
    with caplog.at_level(logging.WARNING):
        assert txt2img.main([*model_args(tiny)[:4], "--outdir", str(tmp_path / "o"), "--prompt", "p",
                             "--n_samples", "1", "--n_iter", "1", "--steps", "1"]) == 0
    assert len([r for r in caplog.records if "safety checker disabled" in r.getMessage()]) == 1


def _mismatched_config(tiny, tmp_path: Path) -> Path:
    text = tiny[0].read_text().replace("context_dim: 32", "context_dim: 48")
    path = tmp_path / "other.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("case, message", [
    ("H", "--H 33 is not a multiple of 2 (the model's downsampling factor): use 32 or 34"),
    ("W", "--W 31 is not a multiple of 2"),
    ("f", "--f 8 does not match the model, whose autoencoder downsamples by 2: drop --f"),
    ("C", "--C 3 does not match the model's 4 latent channels"),
    ("steps", "--ddim_steps 1001 exceeds the model's 1000 diffusion timesteps"),
    ("mismatch", "does not fit the model"),
    ("corrupt", "cannot read safetensors file"),
    ("missing", "does not exist"),
    ("empty_file", "contains no prompts"),
    ("bad_yaml", "has no 'model:' section"),
    ("vae_is_full", "is a full model checkpoint, not an autoencoder"),
    ("outdir_file", "is a file, not a folder"),
])
def test_user_errors_exit_2_and_write_nothing(tiny, tmp_path: Path, capsys, case: str, message: str):
    out = tmp_path / "out"
    args = [*model_args(tiny), "--prompt", "p", "--n_samples", "1", "--n_iter", "1"]
    extra = {"H": ["--H", "33"], "W": ["--W", "31"], "f": ["--f", "8"], "C": ["--C", "3"],
             "steps": ["--ddim_steps", "1001"], "vae_is_full": ["--vae", str(tiny[1])]}.get(case, [])
    if case == "mismatch":
        args[1] = str(_mismatched_config(tiny, tmp_path))
    if case == "corrupt":
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(tiny[1].read_bytes()[:5000])
        args[3] = str(bad)
    if case == "missing":
        args[3] = str(tmp_path / "nope.ckpt")
    if case == "empty_file":
        (tmp_path / "empty.txt").write_text("\n \n")
        args[args.index("--prompt"):args.index("--prompt") + 2] = ["--from-file", str(tmp_path / "empty.txt")]
    if case == "bad_yaml":
        (tmp_path / "bad.yaml").write_text("just: [a, list]\n")
        args[1] = str(tmp_path / "bad.yaml")
    if case == "outdir_file":
        (tmp_path / "parent").write_text("x")
        out = tmp_path / "parent" / "out"
    assert txt2img.main([*args, *extra, "--outdir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("txt2img.py: error: ")
    assert not out.exists()


@pytest.mark.slow
def test_script_runs_as_a_subprocess(tiny, tmp_path: Path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), *model_args(tiny), "--prompt",
                           "a red circle", "--n_samples", "1", "--n_iter", "1", "--outdir", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("Done: 1 image in")
    assert [f.name for f in samples(out)] == ["00000.png"] and (out / "grid-0000.png").is_file()
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--steps", "0"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "--ddim_steps/--steps must be at least 1" in bad.stderr

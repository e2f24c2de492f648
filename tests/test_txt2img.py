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
    assert meta["Sampler"] == ("PLMS" if "plms" in flag else "DPM-Solver")


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


def test_vae_flag_replaces_the_autoencoder_weights(tiny, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    prefix = "first_stage_model."
    vae = {k[len(prefix):]: v.clone() for k, v in load_file(str(tiny[1])).items() if k.startswith(prefix)}
    vae["decoder.conv_out.bias"] += 0.5  # a visibly different decoder
    # released VAE files carry training leftovers such as loss.*
    save_file({**vae, "loss.logvar": torch.zeros(())}, str(tmp_path / "my-vae.safetensors"))
    save_file({prefix + k: v for k, v in vae.items()}, str(tmp_path / "prefixed.safetensors"))
    args = ["--prompt", "p", "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    assert generate(tiny, tmp_path / "plain", *args) == 0
    assert generate(tiny, tmp_path / "vae", *args, "--vae", str(tmp_path / "my-vae.safetensors")) == 0
    assert generate(tiny, tmp_path / "pre", *args, "--vae", str(tmp_path / "prefixed.safetensors")) == 0
    plain, with_vae = pixels(samples(tmp_path / "plain")[0]), pixels(samples(tmp_path / "vae")[0])
    assert with_vae.astype(int).mean() > plain.astype(int).mean() + 20
    np.testing.assert_array_equal(with_vae, pixels(samples(tmp_path / "pre")[0]))
    assert parse_parameters(read_parameters(samples(tmp_path / "vae")[0]))["VAE"] == "my-vae"


def test_ema_or_raw_weights_of_a_full_checkpoint(tiny, tmp_path: Path):
    from safetensors.torch import load_file, save_file

    from ldm.checkpoint import ema_key

    raw = load_file(str(tiny[1]))
    torch.manual_seed(1)
    full = dict(raw)
    for key, value in raw.items():
        if key.startswith("model."):
            full[ema_key(key)] = value + 0.05 * torch.randn_like(value)
    full["model_ema.decay"], full["model_ema.num_updates"] = torch.tensor(0.9999), torch.tensor(10, dtype=torch.int)
    save_file(full, str(tmp_path / "full.safetensors"))
    shutil.copy(tiny[0], tmp_path / "full.yaml")
    args = ["--prompt", "p", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no_safety_check", "--steps", "2"]
    outputs = {}
    for name, flags in (("default", []), ("ema", ["--use_ema"]), ("raw", ["--no_ema"])):
        assert txt2img.main(["--ckpt", str(tmp_path / "full.safetensors"), "--outdir", str(tmp_path / name),
                             *args, *flags]) == 0
        outputs[name] = pixels(samples(tmp_path / name)[0])
    assert generate(tiny, tmp_path / "raw-only", *args) == 0
    np.testing.assert_array_equal(outputs["default"], outputs["ema"])
    np.testing.assert_array_equal(outputs["raw"], pixels(samples(tmp_path / "raw-only")[0]))
    assert not np.array_equal(outputs["ema"], outputs["raw"])


def _fake_checkpoint(path: Path, unet_in_channels: int = 4, text: str = "sd1") -> Path:
    from safetensors.torch import save_file

    keys = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, unet_in_channels, 1, 1),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(2, 3, 1, 1)}
    if text == "sd1":
        keys["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(2)
    elif text == "sd2":
        keys["cond_stage_model.model.transformer.resblocks.0.ln_1.weight"] = torch.zeros(2)
    else:
        keys = {"encoder.conv_in.weight": torch.zeros(2, 3, 1, 1)}
    if path.suffix == ".safetensors":
        save_file(keys, str(path))
    else:
        torch.save({"state_dict": keys, "global_step": 5}, path)
    return path


@pytest.mark.parametrize("name, text, config", [
    ("sd-v1-5.safetensors", "sd1", "v1-inference.yaml"),
    ("sd-v1-4.ckpt", "sd1", "v1-inference.yaml"),
    ("v2-1_768-ema-pruned.safetensors", "sd2", "v2-inference-v.yaml"),
    ("v2-1_512-ema-pruned.ckpt", "sd2", "v2-inference.yaml"),
])
def test_config_is_inferred_from_the_checkpoint_keys(tmp_path: Path, caplog, name: str, text: str, config: str):
    ckpt = _fake_checkpoint(tmp_path / name, text=text)
    with caplog.at_level(logging.INFO):
        path, state_dict = loading.infer_config(ckpt)
    assert path.name == config and path.is_file()
    assert (state_dict is None) == name.endswith(".safetensors")  # safetensors: only the header is read
    if text == "sd2":  # eps vs v cannot be told from the weights: say what was assumed and how to override
        warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][0]
        assert "assumed" in warning and "--config configs/stable-diffusion/" in warning


def test_config_beside_the_checkpoint_wins(tmp_path: Path):
    ckpt = _fake_checkpoint(tmp_path / "custom.safetensors")
    (tmp_path / "custom.yaml").write_text("model: {target: x}\n")
    assert loading.infer_config(ckpt) == (tmp_path / "custom.yaml", None)


@pytest.mark.parametrize("kind, messages", [("inpainting", ("inpainting checkpoint", "inpaint.py")),
                                            ("vae", ("cannot infer the config",
                                                     "not a full Stable Diffusion checkpoint"))])
def test_unsupported_checkpoints_are_named(tiny, tmp_path: Path, capsys, kind: str, messages: tuple[str, str]):
    """A VAE file is not a model; an inpainting checkpoint is one for scripts/inpaint.py."""
    ckpt = _fake_checkpoint(tmp_path / f"{kind}.safetensors", unet_in_channels=9 if kind == "inpainting" else 4,
                            text="sd1" if kind == "inpainting" else "none")
    assert txt2img.main(["--ckpt", str(ckpt), "--prompt", "p", "--outdir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert all(m in err for m in messages) and not (tmp_path / "out").exists()


def test_plan_jobs_seeds_and_batches():
    from ldm.inference.pipeline import Job, plan_jobs

    assert plan_jobs(["p"], n_samples=2, n_iter=2, seed=10) == [Job(("p", "p"), (10, 11)), Job(("p", "p"), (12, 13))]
    jobs = plan_jobs(["a", "b", "c"], n_samples=2, n_iter=2, seed=0, batch_of_copies=False)
    assert [j.prompts for j in jobs] == [("a", "b"), ("c",), ("a", "b"), ("c",)]
    assert [j.seeds for j in jobs] == [(0, 1), (2,), (3, 4), (5,)]
    jobs = plan_jobs(["a", "b"], n_samples=3, n_iter=1, seed=0, repeat=2, batch_of_copies=False)
    assert [j.prompts for j in jobs] == [("a", "a", "b"), ("b",)]
    assert [j.seeds for j in plan_jobs(["p"], 2, 3, seed=5, fixed_code=True)] == [(5, 6)] * 3


def test_noise_is_per_image_and_device_independent():
    from ldm.inference.pipeline import draw, generators

    both = draw(generators([3, 4]), (4, 2, 2), "cpu")
    alone = draw(generators([4]), (4, 2, 2), "cpu")
    assert both.shape == (2, 4, 2, 2) and torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[1])


class _NaNInHalfPrecision(torch.nn.Module):
    """Fake model whose decoder overflows under autocast, as fp16 VAEs do."""

    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled("cpu"):
            return torch.full((z.shape[0], 3, 4, 4), float("nan"))
        return torch.zeros(z.shape[0], 3, 4, 4)


def test_nan_decode_in_half_precision_is_redone_in_float32(caplog):
    from ldm.inference.pipeline import Precision, decode

    with caplog.at_level(logging.WARNING):
        images = decode(_NaNInHalfPrecision(), torch.zeros(2, 4, 2, 2), Precision("cpu", torch.bfloat16))
    assert torch.equal(images, torch.full((2, 3, 4, 4), 0.5))
    assert "decoding again in float32" in caplog.text


def test_precision_choice():
    from ldm.inference.pipeline import choose_precision

    assert choose_precision("cpu", "autocast", bf16=False).dtype is None  # float32 on CPUs
    assert choose_precision("cpu", "autocast", bf16=True).dtype is torch.bfloat16
    assert choose_precision("cuda", "autocast", bf16=False).dtype is torch.float16
    assert choose_precision("cuda:1", "full", bf16=False).dtype is None
    assert choose_precision("cuda", "full", bf16=True).dtype is torch.bfloat16  # --bf16 implies autocast (SD 2)


def test_default_watermark_payload_follows_the_model_generation():
    geometry = loading.ModelGeometry(4, 8, 64, 1000, "FrozenOpenCLIPEmbedder")
    assert loading.default_watermark(geometry) == "SDV2"
    assert loading.default_watermark(loading.ModelGeometry(4, 8, 64, 1000, "FrozenCLIPEmbedder")) == \
        "StableDiffusionV1"

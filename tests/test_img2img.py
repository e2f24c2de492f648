"""scripts/img2img.py end to end with a tiny random model on the CPU: strength semantics, resizing, errors."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm.checkpoint import load_model_from_config
from ldm.inference import pipeline
from ldm.inference.metadata import parse_parameters
from ldm.inference.outputs import read_parameters
from ldm.modules.safety import numpy_to_pil
from ldm.samplers import resolve
from tiny_model import (FACTOR, PIXELS, ROOT, assert_same_image, load_script, model_args, pixels, samples,
                        write_tiny_model)

img2img, txt2img = load_script("img2img"), load_script("txt2img")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def write_image(path: Path, width: int, height: int) -> Path:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1)
    Image.fromarray(rgb.astype(np.uint8)).save(path)
    return path


def run(tiny, outdir: Path, init: Path, *extra: str) -> int:
    return img2img.main([*model_args(tiny), "--init-img", str(init), "--outdir", str(outdir), "--prompt",
                         "a red circle", "--n_iter", "1", *extra])


def test_end_to_end_resizes_to_the_factor_and_records_the_strength(tiny, tmp_path: Path, capsys):
    init = write_image(tmp_path / "init.png", PIXELS + 5, PIXELS + 1)
    out = tmp_path / "out"
    assert run(tiny, out, init, "--strength", "0.5", "--n_samples", "2", "--seed", "9") == 0
    files = samples(out)
    assert [f.name for f in files] == ["00000.png", "00001.png"] and (out / "grid-0000.png").is_file()
    width, height = PIXELS + 5 - (PIXELS + 5) % FACTOR, PIXELS + 1 - (PIXELS + 1) % FACTOR
    for k, f in enumerate(files):
        with Image.open(f) as image:
            assert image.size == (width, height)
        meta = parse_parameters(read_parameters(f))
        assert meta["Denoising strength"] == "0.5" and meta["Seed"] == str(9 + k)
        assert meta["Size"] == f"{width}x{height}" and meta["Sampler"] == "DDIM" and meta["CFG scale"] == "5"
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("Done: 2 images in")


def test_explicit_size_resizes_the_init_image(tiny, tmp_path: Path):
    init = write_image(tmp_path / "init.png", 50, 50)
    assert run(tiny, tmp_path / "o", init, "--W", "24", "--H", "16", "--n_samples", "1", "--skip_grid") == 0
    with Image.open(samples(tmp_path / "o")[0]) as image:
        assert image.size == (24, 16)


def test_strength_zero_returns_the_init_image_through_the_autoencoder(tiny, tmp_path: Path):
    init = write_image(tmp_path / "init.png", PIXELS, PIXELS)
    assert run(tiny, tmp_path / "o", init, "--strength", "0", "--n_samples", "1", "--seed", "4") == 0
    model = load_model_from_config(OmegaConf.load(tiny[0]), tiny[1])
    with torch.no_grad():
        mean, std = pipeline.encode_init(model, pipeline.image_tensor(pipeline.load_init_image(init, FACTOR), "cpu"))
        gens = pipeline.generators([4])
        pipeline.draw(gens, mean.shape[1:], "cpu")  # the first draw is the diffusion noise, unused at strength 0
        z0 = model.scale_factor * (mean + std * pipeline.draw(gens, mean.shape[1:], "cpu"))
        expected = numpy_to_pil(pipeline.to_numpy(pipeline.decode(model, z0, pipeline.Precision("cpu"))))[0]
    assert_same_image(pixels(samples(tmp_path / "o")[0]), np.asarray(expected))


def test_strength_one_is_full_generation_like_txt2img(tiny, tmp_path: Path):
    init = write_image(tmp_path / "init.png", PIXELS, PIXELS)
    common = ["--prompt", "a red circle", "--n_samples", "1", "--n_iter", "1", "--seed", "11", "--scale", "5",
              "--skip_grid"]
    assert img2img.main([*model_args(tiny), "--init-img", str(init), "--strength", "1.0", "--outdir",
                         str(tmp_path / "i"), *common]) == 0
    assert txt2img.main([*model_args(tiny), "--outdir", str(tmp_path / "t"), *common]) == 0
    assert_same_image(pixels(samples(tmp_path / "i")[0]), pixels(samples(tmp_path / "t")[0]))
    other = write_image(tmp_path / "other.png", PIXELS, PIXELS // 2 * 2)
    Image.fromarray(255 - pixels(other)).save(other)
    assert img2img.main([*model_args(tiny), "--init-img", str(other), "--strength", "1", "--outdir",
                         str(tmp_path / "j"), *common]) == 0  # the init image no longer matters
    assert_same_image(pixels(samples(tmp_path / "j")[0]), pixels(samples(tmp_path / "t")[0]))


def test_intermediate_strength_keeps_some_of_the_init_image(tiny, tmp_path: Path):
    init = write_image(tmp_path / "init.png", PIXELS, PIXELS)
    results = {}
    for strength in ("0", "0.5", "1"):
        assert run(tiny, tmp_path / strength, init, "--strength", strength, "--n_samples", "1", "--seed", "2",
                   "--skip_grid") == 0
        results[strength] = pixels(samples(tmp_path / strength)[0]).astype(int)
    assert not np.array_equal(results["0.5"], results["0"]) and not np.array_equal(results["0.5"], results["1"])


@pytest.mark.parametrize("sampler, steps, strength, expected", [
    ("ddim", 10, 0.0, 0), ("ddim", 10, 0.75, 8), ("ddim", 10, 0.99, 10), ("ddim", 10, 1.0, 10),
    ("ddim", 50, 0.3, 16), ("ddim", 30, 1.0, 31), ("euler", 20, 0.5, 11), ("DPM++ 2M Karras", 20, 0.999, 20),
    ("dpm_2", 10, 0.5, 6)])
def test_strength_runs_the_web_ui_tail_of_the_schedule(tiny, sampler: str, steps: int, strength: float,
                                                       expected: int):
    """t_enc = int(min(strength, 0.999) * steps) and sigmas[steps - t_enc - 1:] are run: t_enc + 1 steps; strength 1
    runs the whole schedule (the DDIM grid has 31 steps for 30, as the original's uniform grid)."""
    model = load_model_from_config(OmegaConf.load(tiny[0]), tiny[1])
    assert pipeline.sampler_steps(model, resolve(sampler), steps, strength) == expected


@pytest.mark.parametrize("case, message", [
    ("corrupt", "--init-img: cannot read"),
    ("truncated", "--init-img: cannot read"),
    ("tiny_image", "it needs at least 2 pixels per side"),
    ("missing", "does not exist"),
    ("width", "--W 33 is not a multiple of 2"),
    ("strength", "--strength must be between 0 and 1"),
])
def test_user_errors_exit_2_and_write_nothing(tiny, tmp_path: Path, capsys, case: str, message: str):
    init = write_image(tmp_path / "init.png", PIXELS, PIXELS)
    extra: list[str] = {"width": ["--W", "33"], "strength": ["--strength", "1.5"], }.get(case, [])
    if case == "corrupt":
        init.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    if case == "truncated":
        init.write_bytes(init.read_bytes()[:60])
    if case == "tiny_image":
        write_image(init, 1, 5)
    if case == "missing":
        init = tmp_path / "absent.png"
    out = tmp_path / "out"
    assert run(tiny, out, init, *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("img2img.py: error: ")
    assert not out.exists()


@pytest.mark.slow
def test_script_runs_as_a_subprocess(tiny, tmp_path: Path):
    init = write_image(tmp_path / "photo.jpg", PIXELS, PIXELS)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "img2img.py"), *model_args(tiny), "--prompt",
                           "a blue square", "--init-img", str(init), "--strength", "0.75", "--n_samples", "1",
                           "--outdir", str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("Done: 1 image in")
    assert [f.name for f in samples(out)] == ["00000.png"]

"""The hires fix (two-pass txt2img) on the shipped default model: sizes, passes, parameters, errors."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm import api
from ldm.inference import hires
from ldm.inference.errors import UsageError
from ldm.inference.metadata import parse_parameters
from ldm.inference.outputs import read_parameters
from tiny_model import load_script, samples

PROMPT = "a red circle on a blue background"
FIRST = dict(width=64, height=64, steps=4, seed=11, sampler="Euler")


@pytest.fixture(scope="module")
def gen() -> api.Generator:
    return api.Generator.load(device="cpu")


def test_target_sizes_and_checks():
    h = hires.HiresOptions()
    assert hires.target_size(h, 64, 48, 8) == (128, 96)
    assert hires.target_size(hires.HiresOptions(scale=1.5), 72, 64, 8) == (104, 96)  # floored to multiples of 8
    assert hires.target_size(hires.HiresOptions(resize_x=128), 64, 48, 8) == (128, 96)  # the other side follows
    assert hires.target_size(hires.HiresOptions(resize_y=96), 64, 48, 8) == (128, 96)
    assert hires.target_size(hires.HiresOptions(resize_x=128, resize_y=96), 64, 48, 8) == (128, 96)
    with pytest.raises(UsageError, match="aspect ratio"):
        hires.target_size(hires.HiresOptions(resize_x=128, resize_y=128), 64, 48, 8)
    with pytest.raises(UsageError, match="only enlarges"):
        hires.target_size(hires.HiresOptions(resize_x=32), 64, 48, 8)
    assert hires.checked(hires.HiresOptions(upscaler="latent (BICUBIC)")).upscaler == "Latent (bicubic)"
    for bad, needle in ((dict(upscaler="R-ESRGAN 4x+"), "unknown hires upscaler"), (dict(scale=5), "hr_scale"),
                        (dict(strength=0), "changes nothing"), (dict(strength=1.5), "denoising_strength"),
                        (dict(steps=-1), "hr_second_pass_steps")):
        with pytest.raises(UsageError, match=needle):
            hires.checked(hires.HiresOptions(**bad))


def test_second_pass_doubles_the_picture_and_writes_the_web_ui_keys(gen):
    seen = []
    result = gen.txt2img(PROMPT, hires=hires.HiresOptions(steps=3, strength=0.6), **FIRST,
                         progress=lambda p: seen.append((p.step, p.total)))
    assert result.images[0].size == (128, 128)
    p = parse_parameters(result.parameters[0])
    assert (p["Size"], p["Denoising strength"], p["Hires upscale"], p["Hires steps"], p["Hires upscaler"]) == \
        ("64x64", "0.6", "2", "3", "Latent")
    first = gen.txt2img(PROMPT, **FIRST)
    assert "Hires upscale" not in first.parameters[0]
    # progress counts both passes: 4 Euler steps, then int(0.6 * 3) + 1 = 2 of the second pass
    assert seen == [(i, 6) for i in range(1, 7)]
    again = gen.txt2img(PROMPT, hires=hires.HiresOptions(steps=3, strength=0.6), **FIRST)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))  # seeded, reproducible


def test_second_pass_starts_from_the_upscaled_first_picture(gen):
    first = np.asarray(gen.txt2img(PROMPT, **FIRST).images[0].resize((128, 128), Image.NEAREST), dtype=float)
    other = np.asarray(gen.txt2img("a yellow square on a green background", **FIRST).images[0].resize(
        (128, 128), Image.NEAREST), dtype=float)
    light = gen.txt2img(PROMPT, hires=hires.HiresOptions(upscaler="Nearest", steps=20, strength=0.05), **FIRST)
    near = np.abs(np.asarray(light.images[0], dtype=float) - first).mean()
    assert near < 0.25 * np.abs(other - first).mean() and near < 5  # a light second pass keeps the first picture
    latent = gen.txt2img(PROMPT, hires=hires.HiresOptions(upscaler="Latent (nearest)", steps=20, strength=0.05),
                         **FIRST)
    assert latent.images[0].size == (128, 128)
    assert parse_parameters(light.parameters[0])["Hires upscaler"] == "Nearest"


def test_hires_is_txt2img_only(gen):
    image = Image.new("RGB", (64, 64), "white")
    with pytest.raises(UsageError, match="txt2img"):
        gen.img2img(image, PROMPT, hires=hires.HiresOptions(), steps=2)
    with pytest.raises(UsageError, match="unknown hires upscaler"):
        gen.txt2img(PROMPT, hires=hires.HiresOptions(upscaler="SwinIR 4x"), **FIRST)


def test_script_flags(tmp_path):
    txt2img = load_script("txt2img")
    out = tmp_path / "out"
    assert txt2img.main(["--prompt", PROMPT, "--outdir", str(out), "--W", "64", "--H", "64", "--ddim_steps", "3",
                         "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no_safety_check", "--hires",
                         "--hr_scale", "1.5", "--hr_upscaler", "Lanczos", "--denoising_strength", "0.5"]) == 0
    (image,) = samples(out)
    assert Image.open(image).size == (96, 96)
    p = parse_parameters(read_parameters(image))
    assert (p["Size"], p["Hires upscale"], p["Hires upscaler"], p["Denoising strength"]) == \
        ("64x64", "1.5", "Lanczos", "0.5")
    assert txt2img.main(["--prompt", PROMPT, "--outdir", str(tmp_path / "bad"), "--hires", "--hr_upscaler",
                         "ESRGAN"]) == 2
    assert txt2img.main(["--prompt", PROMPT, "--outdir", str(tmp_path / "bad"), "--hr_scale", "2.5"]) == 2
    assert not (tmp_path / "bad" / "samples").exists() or not list((tmp_path / "bad" / "samples").iterdir())

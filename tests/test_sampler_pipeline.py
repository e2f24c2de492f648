"""Every sampler through the scripts and the pipeline with a tiny random model: seeds, img2img, metadata, names."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm import samplers
from ldm.checkpoint import load_model_from_config
from ldm.inference import pipeline
from ldm.inference.metadata import ImageParameters, format_parameters, parse_parameters, sampler_of
from ldm.inference.outputs import read_parameters
from tiny_model import PIXELS, assert_same_image, load_script, model_args, pixels, samples, write_tiny_model

txt2img, img2img = load_script("txt2img"), load_script("img2img")
ALL = [s.name for s in samplers.SAMPLERS]
STOCHASTIC = [s.name for s in samplers.SAMPLERS if s.eta]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(tiny):
    return load_model_from_config(OmegaConf.load(tiny[0]), tiny[1])


def latents(model, name: str, seeds: list[int], steps: int = 3, eta=None, schedule=None) -> torch.Tensor:
    job = pipeline.Job(tuple(["a red circle"] * len(seeds)), tuple(seeds))
    gens = pipeline.generators(job.seeds)
    with torch.no_grad():
        cond, uncond = pipeline.conditioning(model, job, "", 5.0, set())
    x_T = pipeline.draw(gens, (4, 16, 16), "cpu")
    return pipeline.sample_txt2img(model, samplers.resolve(name, schedule), x_T, cond, uncond, steps, 5.0, gens,
                                   eta=eta)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_image_depends_on_its_seed_only(model, name: str):
    """Fresh noise (and Brownian trees) come from each image's own generator: image k of a batch equals the same
    seed made alone, the same seed gives the same image, another seed another."""
    batch = latents(model, name, [5, 6])
    alone = latents(model, name, [6])
    torch.testing.assert_close(batch[1:], alone, rtol=1e-4, atol=1e-4)
    assert torch.equal(latents(model, name, [6]), alone)
    assert not torch.allclose(batch[0], batch[1])
    deterministic = latents(model, name, [6], eta=0.0)
    assert not torch.allclose(deterministic, alone)  # eta changes the run


@pytest.mark.parametrize("name", ALL)
def test_img2img_with_every_sampler(tiny, tmp_path: Path, name: str):
    """Every sampler runs img2img; strength 1 equals txt2img of the same seed (the init's shape only)."""
    init = tmp_path / "init.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (PIXELS, PIXELS, 3), dtype=np.uint8)).save(init)
    common = [*model_args(tiny, steps=3), "--prompt", "a red circle", "--n_iter", "1", "--n_samples", "1",
              "--sampler", name, "--skip_grid", "--no_watermark"]
    for strength in ("0.5", "1"):
        assert img2img.main([*common, "--init-img", str(init), "--outdir", str(tmp_path / strength),
                             "--strength", strength]) == 0
    assert txt2img.main([*common, "--outdir", str(tmp_path / "t2i"), "--scale", "5"]) == 0
    half, full, t2i = (pixels(samples(tmp_path / d)[0]) for d in ("0.5", "1", "t2i"))
    assert_same_image(full, t2i)
    assert not np.array_equal(half, full)
    meta = parse_parameters(read_parameters(samples(tmp_path / "0.5")[0]))
    assert sampler_of(meta).spec.name == name and meta["Denoising strength"] == "0.5"


@pytest.mark.parametrize("argv, sampler, schedule", [
    (["--sampler", "DPM++ 2M Karras"], "DPM++ 2M", "Karras"),
    (["--sampler", "Euler a", "--eta", "0.5"], "Euler a", "Uniform"),
    (["--sampler", "DPM++ 2M SDE", "--schedule", "karras"], "DPM++ 2M SDE", "Karras"),
    (["--plms"], "PLMS", None),
])
def test_parameters_name_sampler_and_schedule_as_the_web_ui(tiny, tmp_path: Path, argv, sampler, schedule):
    assert txt2img.main([*model_args(tiny, steps=2), "--prompt", "x", "--n_iter", "1", "--n_samples", "1",
                         "--outdir", str(tmp_path), *argv]) == 0
    meta = parse_parameters(read_parameters(samples(tmp_path)[0]))
    assert meta["Sampler"] == sampler and meta.get("Schedule type") == schedule
    assert ("Eta" in meta) == ("--eta" in argv)


def _png_with(tmp_path: Path, text: str) -> Path:
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", text)
    path = tmp_path / "p.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


@pytest.mark.parametrize("sampler, schedule_type, expected", [
    ("DPM++ 2M", "Karras", ("dpmpp_2m", "karras")), ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),
    ("DPM++ 2M SDE Exponential", None, ("dpmpp_2m_sde", "exponential")), ("Euler a", None, ("euler_ancestral", "normal")),
    ("Euler a", "Uniform", ("euler_ancestral", "normal")), ("DDIM", None, ("ddim", "ddim")),
    ("UniPC", "Karras", ("unipc", "karras")),
])
def test_parameters_read_back_by_sd_parsers_and_by_us(tmp_path: Path, sampler, schedule_type, expected):
    """Both the Sampler + Schedule type form and the older combined form are read by the common parser sd-parsers
    and map back to the same sampler and schedule here."""
    sd_parsers = pytest.importorskip("sd_parsers")
    text = format_parameters(ImageParameters(prompt="a red circle", negative_prompt="blurry", steps=20, sampler=sampler,
                                             cfg_scale=7.5, seed=1, width=64, height=64, schedule_type=schedule_type))
    info = sd_parsers.ParserManager().parse(_png_with(tmp_path, text))
    parsed = info.samplers[0]
    assert parsed.name == sampler and parsed.parameters.get("scheduler") == schedule_type
    settings = {"Sampler": parsed.name}
    if schedule_type:
        settings["Schedule type"] = parsed.parameters["scheduler"]
    choice = sampler_of(settings)
    assert (choice.spec.name, choice.schedule) == expected
    assert sampler_of(parse_parameters(text)).spec.name == expected[0]


def test_every_web_ui_name_resolves():
    for spec in samplers.SAMPLERS:
        for name in (spec.label, spec.label.upper(), spec.name, *spec.aliases):
            assert samplers.resolve(name).spec is spec
        for suffix, schedule in ((" Karras", "karras"), (" Exponential", "exponential")):
            assert samplers.resolve(spec.label + suffix).schedule == schedule
    with pytest.raises(samplers.UnknownSampler, match="did you mean 'Euler a'"):
        samplers.resolve("euler b")
    with pytest.raises(samplers.UnknownSampler, match="unknown schedule"):
        samplers.resolve("euler", "linear")


@pytest.mark.parametrize("name, steps, expected", [("euler", 20, 20), ("dpm_2", 20, 20), ("dpmpp_3m_sde", 10, 10),
                                                   ("ddim", 30, 31), ("heun", 5, 5)])
def test_schedule_lengths(model, name: str, steps: int, expected: int):
    """The web UI's step counts: DPM2 and 3M SDE drop the next-to-last of steps + 1 sigmas; DDIM's grid as the
    original's; every schedule but the original grids ends at 0."""
    choice = samplers.resolve(name)
    sigmas = samplers.sigmas_for(choice, model.alphas_cumprod, steps)
    assert len(sigmas) - 1 == expected and (sigmas.diff() < 0).all()
    assert (sigmas[-1] == 0) == (name not in ("ddim", "plms", "dpm_solver"))

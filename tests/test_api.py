"""The public Python API (``ldm.api``): the scripts' images, progress, cancellation, readable errors, the hook."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from PIL import Image

from server_fixture import shared_generator
from ldm import api
from ldm.inference.errors import UsageError
from ldm.inference.outputs import read_parameters
from tiny_model import load_script

PROMPT = "a red circle on a blue background"
SMALL = dict(width=64, height=64, steps=3)


@pytest.fixture(scope="module")
def gen():
    """The shipped default model, loaded once (shared with the server tests), run on one CPU thread: at 64 px two
    threads gain nothing, and on a busy machine they waited on each other (19 s instead of 0.2 s for one test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield shared_generator()
    torch.set_num_threads(threads)


def test_txt2img_equals_the_script(gen, tmp_path):
    """The script is a thin user of the API: same pixels, same parameters text."""
    txt2img = load_script("txt2img")
    args = ["--prompt", PROMPT, "--seed", "77", "--n_samples", "1", "--n_iter", "1", "--W", "64", "--H", "64",
            "--ddim_steps", "3", "--sampler", "Euler a", "--no_watermark", "--skip_grid", "--precision", "full",
            "--device", "cpu", "--outdir", str(tmp_path)]
    assert txt2img.main(args) == 0
    written = tmp_path / "samples" / "00000.png"
    result = gen.txt2img(PROMPT, seed=77, sampler="Euler a", cfg_scale=7.5, **SMALL)
    assert read_parameters(written) == result.parameters[0]
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(result.images[0]))
    assert result.seeds == [77] and result.info()["all_seeds"] == [77]
    assert "Sampler: DDIM" in gen.txt2img(PROMPT, seed=77, **SMALL).parameters[0]  # no sampler: the scripts' default


def test_progress_preview_and_cancel(gen):
    seen, cancel = [], threading.Event()

    def progress(p: api.Progress) -> None:
        seen.append((p.step, p.total, p.batch, round(p.fraction, 6)))
        if p.step == 1:
            assert p.preview().size == (64, 64)
    full = gen.txt2img(PROMPT, seed=1, batch_size=2, n_iter=2, progress=progress, **SMALL)
    assert [s[:3] for s in seen] == [(i, 3, b) for b in (0, 1) for i in (1, 2, 3)]
    assert seen[-1][3] == 1.0 and len(full.images) == 4 and full.seeds == [1, 2, 3, 4] and not full.interrupted

    def stop_at_two(p: api.Progress) -> None:
        if p.step == 2:
            cancel.set()
    steps = []
    cut = gen.txt2img(PROMPT, seed=1, width=64, height=64, steps=10, n_iter=3, cancel=cancel,
                      progress=lambda p: (steps.append(p.step), stop_at_two(p)))
    assert cut.interrupted and steps == [1, 2] and len(cut.images) == 1 and cut.seeds == [1]


def test_img2img_and_inpaint(gen):
    source = gen.txt2img(PROMPT, seed=3, **SMALL).images[0]
    changed = gen.img2img(source, "a green square", strength=0.5, seed=4, **SMALL)
    assert changed.images[0].size == (64, 64) and "Denoising strength: 0.5" in changed.parameters[0]
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 32, 64))  # repaint the right half...
    kept = gen.inpaint(source, mask, "a green square", seed=5, mask_blur=0, invert_mask=True, **SMALL)
    after, before = np.asarray(kept.images[0]), np.asarray(source)
    assert np.array_equal(after[:, 32:], before[:, 32:])  # ...inverted: the right half is kept exactly
    assert not np.array_equal(after[:, :32], before[:, :32])
    assert "Mask mode: Inpaint not masked" in kept.parameters[0]


@pytest.mark.parametrize("settings, words", [
    (dict(width=60), "width 60 is not a multiple of 8"),
    (dict(steps=0), "steps must be at least 1"),
    (dict(steps=5000), "exceeds the model's 1000"),
    (dict(sampler="Eulr a"), "Euler a"),
    (dict(cfg_scale=float("nan")), "cfg_scale"),
    (dict(seed=-5), "seed"),
    (dict(schedule="wobbly"), "schedule"),
])
def test_bad_settings_are_usage_errors(gen, settings, words):
    with pytest.raises(UsageError, match=words.replace("(", r"\(")):
        gen.txt2img(PROMPT, **{**SMALL, **settings})


def test_bad_calls(gen, tmp_path):
    with pytest.raises(UsageError, match="strength"):
        gen.img2img(Image.new("RGB", (64, 64)), PROMPT, strength=1.5, **SMALL)
    with pytest.raises(UsageError, match="repaints nothing"):
        gen.inpaint(Image.new("RGB", (64, 64)), Image.new("L", (64, 64), 0), PROMPT, **SMALL)
    with pytest.raises(TypeError, match="unknown setting"):
        gen.txt2img(PROMPT, stpes=3)
    with pytest.raises(UsageError, match="does not exist"):
        api.Generator.load(tmp_path / "missing.safetensors")


def test_model_kind_hook(gen, monkeypatch):
    """Another model kind is one function in api.LATENTS: it gets the task and the job, returns latents."""
    calls = []

    def flat(task: api.Task, job, callback) -> torch.Tensor:
        calls.append((job.prompts, job.seeds))
        return torch.zeros(len(job.seeds), *task.shape)
    monkeypatch.setitem(api.LATENTS, "flat", flat)
    monkeypatch.setattr(gen.loaded, "kind", "flat")
    result = gen.txt2img(PROMPT, seed=9, batch_size=2, **SMALL)
    assert calls == [((PROMPT, PROMPT), (9, 10))] and len(result.images) == 2


def test_preview_is_the_estimate_at_half_resolution(gen):
    """From 32 latent cells on, previews decode at half resolution (a quarter of the cost) yet look alike."""
    previews = []
    result = gen.txt2img(PROMPT, seed=6, width=256, height=256, steps=2, sampler="Euler",
                         progress=lambda p: previews.append(p.preview()))
    last, final = np.asarray(previews[-1], dtype=float), np.asarray(result.images[0], dtype=float)
    assert previews[-1].size == (256, 256)
    assert np.abs(last - final).mean() < 10 < final.std()  # Euler's last estimate is the result

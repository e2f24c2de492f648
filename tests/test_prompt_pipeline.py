"""Long and weighted prompts through the generation API and scripts/txt2img.py with the tiny model on the CPU."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.inference import pipeline
from ldm.inference.metadata import parse_parameters
from ldm.inference.outputs import read_parameters
from ldm.util import instantiate_from_config
from tiny_model import load_script, model_args, pixels, samples, tiny_config, write_tiny_model

txt2img = load_script("txt2img")
LONG = ", ".join(f"a red circle number {i}" for i in range(20))  # about 120 tokens: two chunks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> torch.nn.Module:
    text_dir = tmp_path_factory.mktemp("text")
    (text_dir / "config.json").write_text('{"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, '
                                          '"num_attention_heads": 2}')
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.create(tiny_config(text_dir)).model).eval()


def test_short_unweighted_prompts_give_todays_conditioning_bit_for_bit(model):
    """Today's path: one get_learned_conditioning call over the distinct texts, rows gathered."""
    job = pipeline.Job(("a red circle", "a blue square, on green", "a red circle"), (0, 1, 2))
    with torch.no_grad():
        cond, uncond = pipeline.conditioning(model, job, "blurry", 7.5, set())
        today = model.get_learned_conditioning(["a red circle", "a blue square, on green", "blurry"])
    assert torch.equal(cond, today[[0, 1, 0]]) and torch.equal(uncond, today[[2, 2, 2]])


def test_long_prompt_and_short_negative_get_the_same_length(model):
    with torch.no_grad():
        cond, uncond = pipeline.conditioning(model, pipeline.Job((LONG, LONG), (0, 1)), "blurry", 7.5, set())
        short = model.get_learned_conditioning(["blurry", ""])
    assert cond.shape == uncond.shape == (2, 154, 32)
    torch.testing.assert_close(uncond[0, :77], short[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond[0, 77:], short[1], atol=1e-6, rtol=0)  # padded with the empty prompt
    with torch.no_grad():
        cond, uncond = pipeline.conditioning(model, pipeline.Job(("blurry",), (0,)), LONG, 7.5, set())
    assert cond.shape == uncond.shape == (1, 154, 32)


def test_prompts_of_different_lengths_share_one_length(model):
    job = pipeline.Job(("a cat", LONG, f"{LONG} BREAK more"), (0, 1, 2))
    with torch.no_grad():
        cond, uncond = pipeline.conditioning(model, job, "", 1.0, set())
    assert uncond is None and cond.shape == (3, 231, 32)


def test_long_prompt_is_logged_once_and_nothing_is_dropped(model, caplog):
    warned: set = set()
    with caplog.at_level(logging.INFO, logger="ldm.inference.pipeline"), torch.no_grad():
        for _ in range(2):
            pipeline.conditioning(model, pipeline.Job((LONG,), (0,)), "", 7.5, warned)
    notes = [r.getMessage() for r in caplog.records if "chunks" in r.getMessage()]
    assert len(notes) == 1 and "2 chunks of 75 tokens (154 positions)" in notes[0]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def run(tiny, outdir: Path, prompt: str, *extra: str) -> np.ndarray:
    args = [*model_args(tiny), "--outdir", str(outdir), "--prompt", prompt, "--n_samples", "1", "--n_iter", "1",
            "--skip_grid", "--seed", "3", *extra]
    assert txt2img.main(args) == 0
    return pixels(samples(outdir)[0])


def test_txt2img_weighted_long_prompt_keeps_the_prompt_verbatim(tiny, tmp_path: Path):
    prompt = f"(a red:1.3) circle, [blurry] \\(literal\\) BREAK {LONG}"
    image = run(tiny, tmp_path / "a", prompt, "--negative_prompt", "((ugly))")
    meta = parse_parameters(read_parameters(samples(tmp_path / "a")[0]))
    assert meta["Prompt"] == prompt and meta["Negative prompt"] == "((ugly))"
    plain = run(tiny, tmp_path / "b", "a red circle, blurry (literal) BREAK " + LONG, "--negative_prompt", "ugly")
    assert not np.array_equal(image, plain)


def test_txt2img_text_past_75_tokens_changes_the_image(tiny, tmp_path: Path):
    head = " ".join(["red"] * 75)
    assert not np.array_equal(run(tiny, tmp_path / "a", head), run(tiny, tmp_path / "b", head + " zebra giraffe"))


@pytest.mark.parametrize("sampler", ["plms", "dpm"])
def test_long_prompts_with_the_other_samplers(tiny, tmp_path: Path, sampler):
    image = run(tiny, tmp_path, LONG, "--negative_prompt", "(blurry:1.2)", "--sampler", sampler)
    assert image.shape[-1] == 3 and image.std() > 0


def test_training_captions_are_not_parsed(model):
    """get_learned_conditioning (training, evaluate.py) keeps plain text cut at 77 tokens."""
    captions = ["a (red) circle [on] blue BREAK x", LONG]
    with torch.no_grad():
        got = model.get_learned_conditioning(captions)
        plain = model.cond_stage_model(captions)
    assert got.shape == (2, 77, 32) and torch.equal(got, plain)


def test_an_encoder_that_cannot_chunk_still_warns_about_dropped_words(reference_dir, caplog):
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    class Pooled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cond_stage_model = FrozenCLIPEmbedder(version=str(reference_dir / "hf_clip_text"), layer="pooled")

    with caplog.at_level(logging.WARNING):
        pipeline.warn_truncated(Pooled(), [" ".join(["red"] * 80) + " zebra"], set())
    assert "zebra" in caplog.text and "ignored" in caplog.text

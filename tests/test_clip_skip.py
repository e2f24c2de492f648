"""The web UI's "Clip skip" (``--clip_skip``, ``Request.clip_skip``, the server's ``CLIP_stop_at_last_layers``).

Its numbers are checked against diffusers' ``clip_skip`` in ``tests/test_diffusers_convert.py``; here: where it
applies, what the pictures and their parameters show, and the errors.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm import api
from ldm.inference import pipeline
from ldm.inference.args import parse_options
from ldm.inference.errors import UsageError
from ldm.inference.metadata import ImageParameters, format_parameters, parse_parameters
from ldm.inference.outputs import read_parameters
from tiny_model import load_script, model_args, samples, write_tiny_model

SMALL = dict(width=32, height=32, steps=2, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny-clip-skip"))


@pytest.fixture(scope="module")
def sd1(tiny) -> api.Generator:
    config, ckpt = tiny
    return api.Generator.load(ckpt, config, device="cpu")


def test_sd1_encoder_takes_the_earlier_layer_through_the_final_norm(sd1):
    model = sd1.loaded.model
    encoder = model.cond_stage_model
    layers = encoder.clip_skip_layers
    assert layers == len(encoder.transformer.text_model.encoder.layers) >= 2
    tokens = encoder.tokenize(["a red circle"])
    with torch.no_grad():
        last, states = encoder.transformer(tokens)
        with pipeline.clip_skip(model, 2):
            skipped = encoder.encode(["a red circle"])
        expected = encoder.transformer.text_model.final_layer_norm(states[-2])
    torch.testing.assert_close(skipped, expected)
    assert encoder.clip_skip == 1  # back after the block
    assert pipeline.effective_clip_skip(model, 1) == 1 and pipeline.effective_clip_skip(model, layers) == layers
    with pytest.raises(UsageError, match=f"more than the text encoder's {layers} layers"):
        pipeline.effective_clip_skip(model, layers + 1)


def test_api_pictures_and_parameters_follow_clip_skip(sd1):
    plain = sd1.txt2img("a red circle", **SMALL)
    skipped = sd1.txt2img("a red circle", clip_skip=2, **SMALL)
    assert "Clip skip" not in parse_parameters(plain.parameters[0])
    assert parse_parameters(skipped.parameters[0])["Clip skip"] == "2"
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(skipped.images[0]))
    again = sd1.txt2img("a red circle", clip_skip=2, **SMALL)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(skipped.images[0]))
    assert sd1.loaded.model.cond_stage_model.clip_skip == 1  # the request's setting did not stay
    with pytest.raises(UsageError, match="clip_skip"):
        sd1.txt2img("a red circle", clip_skip=0, **SMALL)
    with pytest.raises(UsageError, match="more than the text encoder"):
        sd1.txt2img("a red circle", clip_skip=40, **SMALL)


def test_encoders_without_clip_skip_ignore_it_with_a_warning(caplog):
    gen = api.Generator.load(device="cpu")  # the default model: an OpenCLIP text encoder, as SD 2
    assert gen.loaded.model.cond_stage_model.clip_skip_layers == 0
    plain = gen.txt2img("a red circle on a blue background", **SMALL)
    with caplog.at_level(logging.WARNING):
        asked = gen.txt2img("a red circle on a blue background", clip_skip=2, **SMALL)
    assert "has no effect on this model's text encoder" in caplog.text
    assert "Clip skip" not in asked.parameters[0]
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(asked.images[0]))


def test_script_flag_writes_clip_skip_into_the_png(tiny, tmp_path):
    txt2img = load_script("txt2img")
    out = tmp_path / "out"
    assert txt2img.main([*model_args(tiny), "--outdir", str(out), "--prompt", "a red circle", "--n_samples", "1",
                         "--n_iter", "1", "--skip_grid", "--clip-skip", "2", "--W", "32", "--H", "32"]) == 0
    (image,) = samples(out)
    assert parse_parameters(read_parameters(image))["Clip skip"] == "2"
    assert parse_options(["--prompt", "x", "--clip_skip", "2"], "txt2img").clip_skip == 2
    with pytest.raises(UsageError, match="--clip_skip"):
        parse_options(["--prompt", "x", "--clip_skip", "0"], "txt2img")


def test_parameters_text_places_clip_skip_after_denoising_strength():
    params = ImageParameters("p", "", 20, "Euler", 7.0, 1, 64, 64, model="m", denoising_strength=0.5, clip_skip=2)
    line = format_parameters(params).splitlines()[-1]
    assert line.endswith("Denoising strength: 0.5, Clip skip: 2")
    assert "Clip skip" not in format_parameters(ImageParameters("p", "", 20, "Euler", 7.0, 1, 64, 64, clip_skip=1))

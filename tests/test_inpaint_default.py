"""Inpainting with the shipped default model (a regular 4-channel model): a red circle repainted blue inside the
mask is judged blue by the project's evaluation classifier, and the picture outside the mask is untouched."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from ldm.data.synthetic_shapes import make_scene, render_scene
from ldm.default_model.classify import read_picture
from ldm.inference import inpaint
from ldm.inference.metadata import parse_parameters
from ldm.inference.outputs import read_parameters
from tiny_model import load_script, pixels, samples

script = load_script("inpaint")


def test_default_model_repaints_a_red_circle_blue(tmp_path: Path):
    scene = dataclasses.replace(make_scene(0, 0, ("red", "circle", "white")), cx=0.5, cy=0.5, radius=0.2)
    picture = render_scene(scene, 256)
    picture.save(tmp_path / "circle.png")
    assert read_picture(np.asarray(picture)).colour == "red"
    mask = np.zeros((256, 256), np.uint8)
    mask[44:212, 44:212] = 255  # the circle (radius ~44 px around the centre) and a margin
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    assert script.main(["--init-img", str(tmp_path / "circle.png"), "--mask", str(tmp_path / "mask.png"),
                        "--prompt", "a blue circle on a white background", "--ddim_steps", "10", "--n_samples", "1",
                        "--seed", "42", "--outdir", str(out), "--skip_grid", "--no_safety_check",
                        "--no_watermark"]) == 0  # the invisible watermark changes pixels by a few levels
    result = pixels(samples(out)[0])
    reading = read_picture(result)
    assert (reading.colour, reading.shape, reading.background) == ("blue", "circle", "white")
    outside = np.asarray(inpaint.blur(Image.fromarray(mask), 4)) == 0
    assert np.abs(result.astype(int) - np.asarray(picture).astype(int))[outside].max() <= 1
    meta = parse_parameters(read_parameters(samples(out)[0]))
    assert meta["Denoising strength"] == "0.75" and meta["Mask blur"] == "4" and meta["Model"] == "sd-shapes"

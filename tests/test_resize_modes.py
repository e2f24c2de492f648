"""The web UI's img2img resize modes (``ldm.inference.resize``), against diffusers' ``VaeImageProcessor``."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm import api
from ldm.inference.args import parse_options
from ldm.inference.errors import UsageError
from ldm.inference.resize import resize_image, resize_mode
from ldm.inference.run import plan

DIFFUSERS_MODES = {0: "default", 1: "crop", 2: "fill"}


def _picture(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("source", [(100, 60), (60, 100), (97, 131), (64, 64)])
def test_modes_equal_diffusers_image_processor(source):
    image_processor = pytest.importorskip("diffusers.image_processor")
    processor = image_processor.VaeImageProcessor()
    image = _picture(*source)
    for target in ((64, 64), (96, 64), (64, 96), (80, 48)):
        for mode, name in DIFFUSERS_MODES.items():
            ours = np.asarray(resize_image(image, *target, mode))
            theirs = np.asarray(processor.resize(image, target[1], target[0], resize_mode=name))
            assert ours.shape == (target[1], target[0], 3)
            assert np.array_equal(ours, theirs), (source, target, name)


def test_crop_keeps_the_middle_and_fill_stretches_the_edges():
    image = Image.new("RGB", (128, 64), "red")
    image.paste((0, 0, 255), (0, 0, 32, 64))  # a blue quarter on the left, cropped away
    cropped = np.asarray(resize_image(image, 64, 64, 1))
    assert (cropped[..., 0] > 200).all()
    filled = np.asarray(resize_image(Image.new("RGB", (128, 64), "green"), 64, 64, 2))
    assert (filled[..., 1] > 100).all()  # the bands above and below take the picture's edge rows, not black


def test_mode_names_and_errors():
    assert [resize_mode(v) for v in (0, "1", "2", "just", "Crop and resize", "FILL")] == [0, 1, 2, 0, 1, 2]
    with pytest.raises(UsageError, match="latent upscale"):
        resize_mode(3)
    with pytest.raises(UsageError, match="unknown resize mode"):
        resize_mode("squash")


def test_script_and_api_bring_the_input_by_the_mode(tmp_path):
    picture = _picture(128, 64, seed=1)
    path = tmp_path / "wide.png"
    picture.save(path)
    expected = np.asarray(resize_image(picture, 64, 64, 1))
    p = plan(parse_options(["--init-img", str(path), "--W", "64", "--H", "64", "--resize_mode", "crop", "--outdir",
                            str(tmp_path / "out"), "--prompt", "x"], "img2img"))
    assert p.opts.resize_mode == 1 and np.array_equal(np.asarray(p.init_image), expected)
    with pytest.raises(UsageError, match="latent upscale"):
        parse_options(["--init-img", str(path), "--resize_mode", "3", "--prompt", "x"], "img2img")
    gen = api.Generator.load(device="cpu")
    s = api.settings_for(gen.loaded, api.Request("x", init_image=picture, width=64, height=64, resize_mode=2),
                         "img2img")
    assert np.array_equal(np.asarray(s.init_image), np.asarray(resize_image(picture, 64, 64, 2)))
    mask = Image.new("L", (128, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # the left quarter: cropped away with the picture's sides
    mask.paste(255, (56, 16, 72, 48))  # a block in the middle: kept, at columns 24-40 of the result
    s = api.settings_for(gen.loaded, api.Request("x", init_image=picture, mask=mask, width=64, height=64,
                                                 resize_mode=1, mask_blur=0), "inpaint")
    kept = np.asarray(s.canvas.mask)
    assert kept.shape == (64, 64) and kept[:, :20].max() < 128 and kept[24:40, 26:38].min() > 128

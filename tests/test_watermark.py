"""Invisible watermark: reference parity, a round trip through a PNG file, too-small images."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from ldm.modules.watermark import WATERMARK_V1, WATERMARK_V2, put_watermark, read_watermark, watermark_fits


@pytest.fixture
def io(reference_dir):
    return load_file(str(reference_dir / "watermark.io.safetensors"))


@pytest.mark.parametrize("tag,payload", [("v1", WATERMARK_V1), ("v2", WATERMARK_V2)])
def test_reference_case(io, tag, payload):
    marked = np.asarray(put_watermark(Image.fromarray(io["image_rgb"].numpy()), payload))
    want = io[f"watermarked_rgb_{tag}"].numpy()
    assert marked.shape == want.shape and marked.dtype == np.uint8
    assert np.abs(marked.astype(int) - want.astype(int)).max() <= 1
    decoded = read_watermark(Image.fromarray(marked), len(payload))
    assert decoded == bytes(io[f"decoded_{tag}"].numpy().tolist()) == payload.encode()


def test_round_trip_through_png(io, tmp_path):
    marked = put_watermark(Image.fromarray(io["image_rgb"].numpy()), WATERMARK_V2)
    path = tmp_path / "marked.png"
    marked.save(path)
    with Image.open(path) as reloaded:
        assert read_watermark(reloaded, len(WATERMARK_V2)) == WATERMARK_V2.encode()


@pytest.mark.parametrize("size", [(255, 256), (128, 128), (16384, 4), (32768, 2)])
def test_too_small_image_is_returned_unchanged_with_notice(size, caplog):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    with caplog.at_level(logging.INFO, logger="ldm.modules.watermark"):
        out = put_watermark(image, WATERMARK_V1)
        assert read_watermark(image, len(WATERMARK_V1)) == b""
    assert np.array_equal(np.asarray(out), np.asarray(image))
    assert any("too small" in r.getMessage() for r in caplog.records)


def test_smallest_accepted_sizes_encode():
    assert watermark_fits(256, 256) and watermark_fits(512, 128) and not watermark_fits(255, 256)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (128, 512, 3), dtype=np.uint8))
    out = put_watermark(image, WATERMARK_V2)
    assert out.size == image.size and not np.array_equal(np.asarray(out), np.asarray(image))

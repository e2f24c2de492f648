"""The synthetic shapes data set: deterministic, complete, captions that agree with the pictures."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ldm.data.synthetic_shapes import (COLOURS, SHAPES, SyntheticShapes, combination_of, combinations, make_scene,
                                       plain_caption, render_item, render_scene, write_items, write_metadata)
from ldm.default_model.classify import read_picture

ROOT = Path(__file__).resolve().parents[1]
CAPTION = re.compile(r"^an? (?:(small|large) )?(\w+) (\w+)(?: (?:at the ((?:top|bottom)? ?(?:left|right)?)|in the "
                     r"(centre)))? on an? (\w+) background$")


def test_pictures_are_a_function_of_seed_and_index():
    a, scene_a = render_item(3, 17)
    b, scene_b = render_item(3, 17)
    assert scene_a == scene_b
    assert np.array_equal(np.asarray(a), np.asarray(b))
    c, _ = render_item(4, 17)
    assert not np.array_equal(np.asarray(a), np.asarray(c))


def test_every_block_of_224_items_holds_every_combination_once():
    combos = combinations()
    assert len(combos) == 8 * 4 * 7 == len(set(combos))
    for block in range(2):
        seen = [combination_of(5, block * 224 + i) for i in range(224)]
        assert sorted(seen) == sorted(combos)
    assert [combination_of(5, i) for i in range(224)] != [combination_of(6, i) for i in range(224)]


def test_captions_name_what_the_picture_shows():
    for index in range(120):
        scene = make_scene(0, index)
        m = CAPTION.match(scene.caption)
        assert m, scene.caption
        size, colour, shape, where, centre, background = m.groups()
        assert (colour, shape, background) == (scene.colour, scene.shape, scene.background)
        assert colour != background and colour in COLOURS and shape in SHAPES
        assert scene.plain_caption == plain_caption(colour, shape, background)
        if size:
            assert size == scene.size_name()
        if where:
            assert ("left" in where) == (scene.cx < 0.4) and ("right" in where) == (scene.cx > 0.6)
            assert ("top" in where) == (scene.cy < 0.4) and ("bottom" in where) == (scene.cy > 0.6)
        if centre:
            assert 0.4 <= scene.cx <= 0.6 and 0.4 <= scene.cy <= 0.6


def test_caption_wording_varies_but_plain_form_is_frequent():
    captions = [make_scene(0, i).caption for i in range(400)]
    plain = sum(c == make_scene(0, i).plain_caption for i, c in enumerate(captions))
    assert 0.3 * 400 < plain < 0.8 * 400
    assert any(" at the " in c for c in captions) and any("small" in c or "large" in c for c in captions)


def test_shapes_stay_inside_the_picture_with_plain_background_border():
    for index in range(60):
        image, scene = render_item(1, index, size=128)
        arr = np.asarray(image)
        border = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]])
        assert (border == np.asarray(COLOURS[scene.background], np.uint8)).all()
        assert (arr == np.asarray(COLOURS[scene.colour], np.uint8)).all(axis=2).sum() > 0.02 * 128 * 128


def test_classifier_reads_real_pictures_exactly():
    for index in range(0, 448, 4):
        image, scene = render_item(11, index)
        assert read_picture(np.asarray(image)).matches(scene.colour, scene.shape, scene.background)["all"], scene


def test_rotation_changes_pixels_not_class():
    base = make_scene(2, 9, ("red", "square", "blue"))
    turned = type(base)(**{**base.__dict__, "rotation": base.rotation + 30})
    a, b = np.asarray(render_scene(base)), np.asarray(render_scene(turned))
    assert not np.array_equal(a, b)
    assert read_picture(b).shape == read_picture(a).shape == "square"


def test_dataset_items_and_crops_are_deterministic():
    ds = SyntheticShapes(size=64, length=10, seed=3, crop=32)
    a, b = ds[(4, 123)], ds[(4, 123)]
    assert a["jpg"].shape == (32, 32, 3) and a["jpg"].min() >= -1 and a["jpg"].max() <= 1
    assert (a["jpg"] == b["jpg"]).all() and a["txt"] == make_scene(3, 4).caption
    with pytest.raises(IndexError):
        ds[10]


def test_written_folder_is_read_by_the_folder_dataset(tmp_path):
    from ldm.data.folder import ImageCaptionFolder

    records = write_items(tmp_path, seed=0, indices=range(6), size=32)
    write_metadata(tmp_path, records)
    ds = ImageCaptionFolder(str(tmp_path), size=32)
    assert len(ds) == 6
    for i in range(6):
        item = ds[i]
        assert item["txt"] == make_scene(0, i).caption
        assert item["jpg"].shape == (32, 32, 3)


def test_make_dataset_script_is_reproducible(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_shapes_dataset.py"), "--out", str(tmp_path / "a"),
                    "--count", "5", "--size", "32", "--workers", "2"], check=True, cwd=ROOT, capture_output=True)
    write_metadata(tmp_path / "b", write_items(tmp_path / "b", seed=0, indices=range(5), size=32))
    for i in range(5):
        assert (tmp_path / "a" / f"{i:07d}.png").read_bytes() == (tmp_path / "b" / f"{i:07d}.png").read_bytes()
    assert (tmp_path / "a" / "metadata.jsonl").read_text() == (tmp_path / "b" / "metadata.jsonl").read_text()

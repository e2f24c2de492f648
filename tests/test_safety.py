"""NSFW safety checker: reference parity (preprocessing, intermediates, flags), the scoring rule, loading."""
from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ldm.modules.encoders.clip_vision import CLIPVisionConfig
from ldm.modules.safety import PreprocessConfig, SafetyChecker, load_safety_checker, nsfw_flags


@pytest.fixture
def reference(reference_dir):
    spec = next(c for c in json.loads((reference_dir / "cases.json").read_text()) if c["name"] == "safety_checker")
    checker = SafetyChecker.from_files(reference_dir / spec["config"], reference_dir / spec["weights"],
                                       reference_dir / spec["preprocessor_config"])
    return spec, checker, load_file(str(reference_dir / spec["io"]))


def tol(spec, key):
    t = spec.get("tolerances", {}).get(key, {"atol": spec["atol"], "rtol": spec["rtol"]})
    return {"atol": t["atol"], "rtol": t["rtol"]}


def test_reference_case(reference):
    spec, checker, io = reference
    x = io["x_image"].numpy()
    x_before = x.copy()
    clip_input = checker.preprocess(x)
    torch.testing.assert_close(clip_input, io["clip_input"], **tol(spec, "clip_input"))
    torch.testing.assert_close(checker.image_embeds(clip_input), io["image_embeds"], **tol(spec, "image_embeds"))
    special, concept = checker.cosine_distances(clip_input)
    torch.testing.assert_close(special, io["special_cos_dist"], **tol(spec, "special_cos_dist"))
    torch.testing.assert_close(concept, io["cos_dist"], **tol(spec, "cos_dist"))
    checked, flags = checker(x, clip_input)
    assert flags == io["has_nsfw_concept"].tolist() == [False, True, True, False]
    torch.testing.assert_close(torch.as_tensor(checked), io["checked_images"], **tol(spec, "checked_images"))
    assert np.array_equal(x, x_before)  # the caller's array is not modified
    assert checker.check(x)[1] == flags


def test_special_care_adjustment_rule():
    special_thr, concept_thr = [0.5, 0.5, 0.5], [0.3] * 17
    concept = np.full((1, 17), 0.2, dtype=np.float32)
    concept[0, 11] = np.float32(0.295)  # -0.005 below its threshold
    clean = np.full((1, 3), 0.1, dtype=np.float32)
    care = clean.copy()
    care[0, 0] = 0.6  # special-care concept 0 exceeds: +0.01 for all later scores
    assert nsfw_flags(clean, concept, special_thr, concept_thr) == [False]
    assert nsfw_flags(care, concept, special_thr, concept_thr) == [True]
    assert nsfw_flags(care, np.full((1, 17), 0.2, np.float32), special_thr, concept_thr) == [False]
    above = np.full((1, 17), 0.2, dtype=np.float32)
    above[0, 4] = 0.31
    assert nsfw_flags(clean, above, special_thr, concept_thr) == [True]


def test_preprocess_resizes_shorter_side_and_crops():
    checker = SafetyChecker(CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=16, patch_size=8), 4,
                            PreprocessConfig.from_dict({"size": {"shortest_edge": 16}, "crop_size": 16}))
    images = np.random.default_rng(0).random((2, 20, 50, 3), dtype=np.float32)
    pixels = checker.preprocess(images)
    assert pixels.shape == (2, 3, 16, 16) and pixels.dtype == torch.float32
    checked, flags = checker(images, pixels)
    assert len(flags) == 2 and checked.shape == images.shape


def test_missing_folder_or_weights_gives_none_and_one_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.modules.safety"):
        assert load_safety_checker(tmp_path / "absent") is None
    assert len(caplog.records) == 1 and "never downloaded" in caplog.records[0].getMessage()
    caplog.clear()
    (tmp_path / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING, logger="ldm.modules.safety"):
        assert load_safety_checker(tmp_path) is None
        assert load_safety_checker(None) is None
    assert len(caplog.records) == 2 and "model.safetensors" in caplog.records[0].getMessage()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_from_folder_with_and_without_position_ids(reference, reference_dir, tmp_path, fmt):
    spec, checker, io = reference
    shutil.copy(reference_dir / spec["config"], tmp_path / "config.json")
    shutil.copy(reference_dir / spec["preprocessor_config"], tmp_path / "preprocessor_config.json")
    sd = {k: v for k, v in load_file(str(reference_dir / spec["weights"])).items() if not k.endswith("position_ids")}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, str(tmp_path / "model.safetensors"))
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    loaded = load_safety_checker(tmp_path)
    assert loaded is not None
    clip_input = io["clip_input"]
    torch.testing.assert_close(loaded.image_embeds(clip_input), checker.image_embeds(clip_input), atol=0, rtol=0)


def test_full_size_layout_on_meta(reference_dir):
    layout = json.loads((reference_dir / "layouts" / "safety_checker_keys.json").read_text())
    want = {k: v[:2] for k, v in layout.items()}
    vit_l14 = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                               num_attention_heads=16, image_size=224, patch_size=14)
    with torch.device("meta"):
        checker = SafetyChecker(vit_l14, 768)
    got = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in checker.state_dict().items()}
    assert got == want

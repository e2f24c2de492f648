"""The shipped SD configs build models whose state_dicts are exactly the real checkpoints' layouts (on meta)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.model_family import detect_family
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "stable-diffusion"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def build_on_meta(config_name: str) -> torch.nn.Module:
    cfg = OmegaConf.load(CONFIGS / config_name)
    with torch.device("meta"):
        return instantiate_from_config(cfg.model)


def layout(model: torch.nn.Module) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config_name,layout_file", [
    ("v1-inference.yaml", "sd_v1_keys.json"),
    ("v2-inference.yaml", "sd_v2_keys.json"),
    ("v2-inference-v.yaml", "sd_v2v_keys.json"),
])
def test_config_builds_real_checkpoint_layout(reference_dir, config_name, layout_file):
    want = {k: v[:2] for k, v in json.loads((reference_dir / "layouts" / layout_file).read_text()).items()}
    model = build_on_meta(config_name)
    got = layout(model)
    for opt in (POSITION_IDS,):  # real SD 1 checkpoints differ on this buffer: either way is fine
        got.pop(opt, None)
        want.pop(opt, None)
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    wrong = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
    assert wrong == {}
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated


def test_layouts_are_recognised(reference_dir):
    for name, fam in (("sd_v1_keys.json", "sd1"), ("sd_v2_keys.json", "sd2-v")):
        keys = json.loads((reference_dir / "layouts" / name).read_text())
        sd = {k: torch.empty(v[0], device="meta") for k, v in keys.items()}
        assert detect_family(sd).name == fam
    keys = json.loads((reference_dir / "layouts" / "sd_v2_keys.json").read_text())
    sd = {k: torch.empty(v[0], device="meta") for k, v in keys.items()}
    base = detect_family(sd, "v2-1_512-ema-pruned.safetensors")
    assert base.name == "sd2" and base.config.name == "v2-inference.yaml" and "v-prediction" in base.assumption
    keys = json.loads((reference_dir / "layouts" / "sd_v2_inpainting_keys.json").read_text())
    sd = {k: torch.empty(v[0], device="meta") for k, v in keys.items()}
    inpainting = detect_family(sd)
    assert inpainting.name == "sd2-inpainting" and inpainting.config.name == "v2-inpainting-inference.yaml"


def test_default_model_layout_is_recognised():
    from safetensors import safe_open

    from ldm.model_family import DEFAULT_MODEL_DIR

    with safe_open(str(DEFAULT_MODEL_DIR / "model.safetensors"), framework="pt") as f:
        sd = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    fam = detect_family(sd, "my-finetune.safetensors")  # e.g. a fine-tune of the default model, no config beside it
    assert fam.name == "sd-shapes" and fam.config == DEFAULT_MODEL_DIR / "config.yaml" and not fam.assumption
    sd["model.diffusion_model.out.2.bias"] = torch.empty(8, device="meta")  # another small model: not it
    assert detect_family(sd).name == "sd2-v"

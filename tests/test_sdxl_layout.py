"""The shipped SDXL configs (the original sgm files) build exactly the real checkpoints' layouts, on the meta device."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import load_weights, mismatch_message
from ldm.config_policy import check_config, refusal
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "sdxl"
# Buffers a released SDXL file may or may not carry; the model always has them.
OPTIONAL = ("denoiser.sigmas", "conditioner.embedders.0.transformer.text_model.embeddings.position_ids")


def build_on_meta(name: str) -> torch.nn.Module:
    config = OmegaConf.load(CONFIGS / name)
    check_config(config, name)  # the sgm.* targets pass the untrusted-config policy
    with torch.device("meta"):
        return instantiate_from_config(config.model)


def layout(model: torch.nn.Module) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}


@pytest.mark.parametrize("config_name,layout_file,unet_params", [
    ("sd_xl_base.yaml", "sdxl_base_keys.json", 2_567_463_684),
    ("sd_xl_refiner.yaml", "sdxl_refiner_keys.json", 2_259_526_660),
])
def test_config_builds_real_sdxl_layout(reference_dir, config_name, layout_file, unet_params):
    want = {k: v[:2] for k, v in json.loads((reference_dir / "layouts" / layout_file).read_text()).items()}
    model = build_on_meta(config_name)
    got = layout(model)
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: (got[k], want[k]) for k in want if got[k] != want[k]} == {}
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) == unet_params
    assert sum(p.numel() for p in model.first_stage_model.parameters()) == 83_653_863
    assert type(model).__module__.startswith("ldm.") and type(model.conditioner).__module__.startswith("ldm.")
    release = {k: torch.empty(v[0], device="meta") for k, v in want.items() if k not in OPTIONAL}
    assert mismatch_message(model.state_dict(), release) is None  # files without the optional buffers fit


def test_release_without_optional_buffers_loads_filled(reference_dir):
    """Through the one loading module: missing sigmas / position_ids are filled with the right values; a saved
    open_clip attention mask is ignored."""
    cfg = OmegaConf.load(reference_dir / "sdxl" / "sdxl_tiny.yaml")
    if not (reference_dir / "sdxl" / "sdxl_tiny.weights.safetensors").is_file():
        pytest.skip("no tiny SDXL weights")
    import open_clip
    from safetensors.torch import load_file

    open_clip.add_model_config(str(reference_dir / "sdxl" / "SDXL-Tiny-OpenCLIP-16A.json"))
    cfg.model.params.conditioner_config.params.emb_models[0].params.version = str(
        reference_dir / "sdxl" / "hf_clip_text_sdxl")
    model = instantiate_from_config(cfg.model)
    full = load_file(str(reference_dir / "sdxl" / "sdxl_tiny.weights.safetensors"))
    release = {k: v for k, v in full.items() if k not in OPTIONAL}
    release["conditioner.embedders.1.model.attn_mask"] = torch.zeros(77, 77)
    model.denoiser.sigmas.zero_()
    report = load_weights(model, release)
    assert report.ignored == ["conditioner.embedders.1.model.attn_mask"]
    for key in OPTIONAL:  # the schedule's float32 rounding may differ by an ulp between CPUs
        assert torch.allclose(model.state_dict()[key].double(), full[key].double(), rtol=1e-6, atol=0)
    model.denoiser.sigmas.zero_()
    load_weights(model, dict(full))
    assert torch.equal(model.denoiser.sigmas, full["denoiser.sigmas"])  # a float32 table is used as saved


def test_sdxl_text_encoder_sizes():
    model = build_on_meta("sd_xl_base.yaml")
    count = [sum(p.numel() for p in e.parameters()) for e in model.conditioner.embedders]
    assert count[:2] == [123_060_480, 694_659_841]  # CLIP-L text, OpenCLIP-bigG text (with projection)
    assert count[2:] == [0, 0, 0]  # size / crop / target-size embedders have no weights
    assert [e.input_key for e in model.conditioner.embedders] == [
        "txt", "txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple"]


def test_missing_optional_buffers_are_filled():
    """A file without ``denoiser.sigmas`` / ``position_ids`` loads; a float16 copy of sigmas gives the exact ones."""
    from ldm.modules.diffusionmodules.sdxl_denoiser import DiscreteDenoiser

    cfg = OmegaConf.load(CONFIGS / "sd_xl_base.yaml").model.params.denoiser_config
    denoiser = instantiate_from_config(cfg)
    exact = denoiser.sigmas.clone()
    assert exact.dtype == torch.float32 and torch.all(exact[1:] > exact[:-1])
    assert abs(float(exact[0]) - 0.0292) < 1e-4 and abs(float(exact[-1]) - 14.6146) < 1e-3
    fresh = DiscreteDenoiser(**cfg.params)
    fresh.sigmas.zero_()
    fresh.load_state_dict({}, strict=True)
    assert torch.equal(fresh.sigmas, exact)
    fresh.load_state_dict({"sigmas": exact.half()}, strict=True)
    assert torch.equal(fresh.sigmas, exact)
    assert fresh.half().sigmas.dtype == torch.float32  # casting never rounds the sigmas


def test_only_listed_sgm_names_are_allowed():
    assert refusal("sgm.models.diffusion.DiffusionEngine") is None
    assert refusal("sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2") is None
    assert refusal("sgm.util.instantiate_from_config") is not None
    assert "sgm classes this project implements" in refusal("sgm.modules.encoders.modules.FrozenT5Embedder")

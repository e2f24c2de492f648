"""The inpainting model class and configs: the real SD 2 inpainting layout, config inference, the conditioning."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.model_family import detect_family, describe_mismatch_hint
from ldm.models.diffusion.inpaint import binarize_mask, concat_conditioning, masked_image
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "stable-diffusion"


def _meta_model(config_name: str) -> torch.nn.Module:
    cfg = OmegaConf.load(CONFIGS / config_name)
    with torch.device("meta"):
        return instantiate_from_config(cfg.model)


def _layout(reference_dir: Path, name: str) -> dict:
    return json.loads((reference_dir / "layouts" / name).read_text())


def test_sd2_inpainting_config_builds_the_real_layout(reference_dir):
    want = {k: v[:2] for k, v in _layout(reference_dir, "sd_v2_inpainting_keys.json").items()}
    model = _meta_model("v2-inpainting-inference.yaml")
    got = {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in model.state_dict().items()}
    assert sorted(set(want) - set(got)) == []
    assert sorted(set(got) - set(want)) == []
    assert {k: (got[k], want[k]) for k in want if got[k] != want[k]} == {}
    assert type(model).__name__ == "LatentInpaintDiffusion" and model.model.conditioning_key == "hybrid"
    assert model.concat_keys == ("mask", "masked_image") and model.finetune_keys is None


def test_sd1_inpainting_config_is_the_sd1_layout_with_nine_input_channels(reference_dir):
    want = {k: v[0] for k, v in _layout(reference_dir, "sd_v1_keys.json").items()}
    got = {k: list(v.shape) for k, v in _meta_model("v1-inpainting-inference.yaml").state_dict().items()}
    got.pop("cond_stage_model.transformer.text_model.embeddings.position_ids", None)
    want.pop("cond_stage_model.transformer.text_model.embeddings.position_ids", None)
    assert set(got) == set(want)
    unet_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert got[unet_in] == [320, 9, 3, 3] and want[unet_in] == [320, 4, 3, 3]
    assert {k for k in want if got[k] != want[k]} == {unet_in}


def _meta_sd(reference_dir: Path, name: str) -> dict:
    return {k: torch.empty(v[0], device="meta") for k, v in _layout(reference_dir, name).items()}


def test_nine_channel_checkpoints_pick_the_inpainting_configs(reference_dir):
    fam = detect_family(_meta_sd(reference_dir, "sd_v2_inpainting_keys.json"), "512-inpainting-ema.safetensors")
    assert fam.name == "sd2-inpainting" and fam.config.name == "v2-inpainting-inference.yaml"
    assert not fam.assumption
    sd1 = _meta_sd(reference_dir, "sd_v1_keys.json")
    sd1["model.diffusion_model.input_blocks.0.0.weight"] = torch.empty(320, 9, 3, 3, device="meta")
    fam1 = detect_family(sd1, "sd-v1-5-inpainting.ckpt")
    assert fam1.name == "sd1-inpainting" and fam1.config.name == "v1-inpainting-inference.yaml"
    hint = describe_mismatch_hint(sd1, _meta_sd(reference_dir, "sd_v1_keys.json"))
    assert "v1-inpainting-inference.yaml" in hint
    del sd1["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    for k in [k for k in sd1 if k.startswith("cond_stage_model.")]:
        del sd1[k]
    with pytest.raises(ValueError, match="inpainting checkpoint .* --config"):
        detect_family(sd1)


def test_conditioning_is_mask_then_masked_latent():
    mask = torch.tensor([[0.0, 0.49], [0.5, 1.0]]).repeat_interleave(4, 0).repeat_interleave(4, 1)[None, None]
    binary = binarize_mask(mask)
    assert binary.unique().tolist() == [0.0, 1.0]
    assert binary[0, 0, 0, 4] == 0 and binary[0, 0, 4, 0] == 1  # 0.49 kept, 0.5 repainted
    image = torch.rand(1, 3, 8, 8) * 2 - 1
    blanked = masked_image(image, binary)
    assert torch.equal(blanked[:, :, :4], image[:, :, :4]) and not blanked[:, :, 4:].any()
    latent = torch.randn(1, 4, 2, 2)
    c = concat_conditioning(binary, latent)
    assert c.shape == (1, 5, 2, 2)
    assert c[0, 0].tolist() == [[0.0, 0.0], [1.0, 1.0]] and torch.equal(c[:, 1:], latent)


def test_finetuning_from_a_regular_checkpoint_widens_the_input_layer(tmp_path):
    """finetune_keys + ckpt_path: the 4-channel weights fill the first input channels, the new ones start at 0."""
    from tiny_model import write_tiny_model

    from ldm.checkpoint import load_state_dict_file

    config_path, ckpt = write_tiny_model(tmp_path)
    cfg = OmegaConf.load(config_path)
    cfg.model.target = "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    cfg.model.params.conditioning_key = "hybrid"
    cfg.model.params.unet_config.params.in_channels = 9
    with pytest.raises(ValueError, match="finetune_keys needs a ckpt_path"):
        instantiate_from_config(cfg.model)
    cfg.model.params.ckpt_path = str(ckpt)
    model = instantiate_from_config(cfg.model)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    old, new = load_state_dict_file(str(ckpt))[key], model.state_dict()[key]
    assert new.shape[1] == 9 and torch.equal(new[:, :4], old) and not new[:, 4:].any()
    other = "model.diffusion_model.out.2.weight"
    assert torch.equal(model.state_dict()[other], load_state_dict_file(str(ckpt))[other])

"""Key conversion between our checkpoint layout and diffusers' folders, checked against diffusers' own models."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.convert import diffusers_keys as dk
from tiny_model import tiny_config

diffusers = pytest.importorskip("diffusers")

SD2_UNET = {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32, "attention_resolutions": [1, 2],
            "num_res_blocks": 2, "channel_mult": [1, 2, 2], "num_head_channels": 16, "use_spatial_transformer": True,
            "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 24, "use_checkpoint": False,
            "legacy": False}


def _randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (the UNet's zero-initialised outputs would hide mapping errors)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return module.eval()


def _tiny_params(tmp_path: Path):
    return OmegaConf.create(tiny_config(tmp_path)).model.params


def _our_unet(params):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    return _randomise(UNetModel(**params), 1)


@pytest.mark.parametrize("which", ["sd1", "sd2"])
def test_unet_to_diffusers_same_output_and_back(tmp_path, which):
    params = _tiny_params(tmp_path).unet_config.params if which == "sd1" else OmegaConf.create(SD2_UNET)
    ours = _our_unet(OmegaConf.to_container(params))
    theirs = diffusers.UNet2DConditionModel(**dk.unet_config(params)).eval()
    theirs.load_state_dict(dk.unet_to_diffusers(ours.state_dict(), params), strict=True)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    ctx = torch.randn(2, 5, int(params.context_dim))
    with torch.no_grad():
        expected = ours(x, t, context=ctx)
        got = theirs(x, t, encoder_hidden_states=ctx).sample
    assert expected.abs().mean() > 0.01
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    back = dk.unet_from_diffusers(theirs.state_dict(), params)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_vae_to_diffusers_same_output_and_back(tmp_path):
    from ldm.models.autoencoder import AutoencoderKL
    fs = copy.deepcopy(OmegaConf.to_container(_tiny_params(tmp_path).first_stage_config.params))
    fs["ddconfig"].update(ch_mult=[1, 2, 2], num_res_blocks=2, attn_resolutions=[])
    params = OmegaConf.create(fs)
    ours = _randomise(AutoencoderKL(**fs), 2)
    theirs = diffusers.AutoencoderKL(**dk.vae_config(params)).eval()
    theirs.load_state_dict(dk.vae_to_diffusers(ours.state_dict(), params.ddconfig), strict=True)
    image = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        z_ours, z_theirs = ours.encode(image).mean, theirs.encode(image).latent_dist.mean
        torch.testing.assert_close(z_theirs, z_ours, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(theirs.decode(z_ours).sample, ours.decode(z_ours), atol=1e-4, rtol=1e-4)
    back = dk.vae_from_diffusers(theirs.state_dict(), params.ddconfig)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


def test_unknown_unet_key_is_named(tmp_path):
    params = _tiny_params(tmp_path).unet_config.params
    with pytest.raises(KeyError, match="lora_unet_stray"):
        dk.unet_to_diffusers({"lora_unet_stray.weight": torch.zeros(1)}, params)

"""Key conversion between our checkpoint layout and diffusers' folders, checked against diffusers' own models."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
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


OPEN_CLIP_TINY = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "patch_size": 16, "width": 16, "layers": 1,
                                                  "head_width": 16},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 3}}


def _transformers_round_trip(transformers, folder: Path, cfg: dict, sd: dict):
    """A transformers CLIPTextModel loaded from a folder holding ``sd``, and the state dict it saves back."""
    import json

    from safetensors.torch import load_file, save_file
    (folder / "in").mkdir(parents=True)
    (folder / "in" / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(folder / "in" / "model.safetensors"))
    model = transformers.CLIPTextModel.from_pretrained(str(folder / "in")).eval()
    model.save_pretrained(str(folder / "out"))
    return model, load_file(str(folder / "out" / "model.safetensors"))


def _tokens() -> torch.Tensor:
    ids = torch.randint(0, 49406, (2, 77))
    ids[:, 0], ids[:, 9:] = 49406, 49407
    return ids


def test_sd1_text_encoder_to_transformers_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ldm.convert.diffusers_text import text_config, text_from_diffusers, text_to_diffusers
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder
    from tiny_model import write_tiny_model
    write_tiny_model(tmp_path)
    ours = _randomise(FrozenCLIPEmbedder(version=str(tmp_path / "tiny-text")), 3)
    sd = ours.state_dict()
    cfg = text_config(sd, heads=2)
    theirs, saved = _transformers_round_trip(transformers, tmp_path / "hf", cfg, text_to_diffusers(sd))
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).last_hidden_state, ours.encode_tokens(ids), atol=1e-5, rtol=1e-5)
    back = text_from_diffusers(saved, open_clip=False)
    expected = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
    assert back.keys() == expected.keys() and all(torch.equal(back[k], v) for k, v in expected.items())


def test_sd2_open_clip_text_encoder_to_transformers_and_back(tmp_path):
    transformers = pytest.importorskip("transformers")
    from ldm.convert.diffusers_text import add_unused_open_clip, text_config, text_from_diffusers, text_to_diffusers
    from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
    ours = _randomise(FrozenOpenCLIPEmbedder(version=None, arch_config=OPEN_CLIP_TINY, layer="penultimate"), 4)
    sd = ours.state_dict()
    cfg = text_config(sd, heads=2, keep_blocks=2)
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_act"] == "gelu"
    theirs, saved = _transformers_round_trip(transformers, tmp_path, cfg, text_to_diffusers(sd, keep_blocks=2))
    ids = _tokens()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).last_hidden_state, ours.encode_tokens(ids), atol=1e-5, rtol=1e-5)
    back = text_from_diffusers(saved, open_clip=True)
    filled = add_unused_open_clip(back, projection_dim=16)
    assert sorted(filled) == sorted(k for k in sd if "resblocks.2." in k or k.endswith(("text_projection",
                                                                                         "logit_scale")))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items() if k not in filled)
    reloaded = FrozenOpenCLIPEmbedder(version=None, arch_config=OPEN_CLIP_TINY, layer="penultimate")
    reloaded.load_state_dict(back, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.encode_tokens(ids), ours.encode_tokens(ids))


# Whole folders: scripts/convert.py both ways, diffusers' pipeline loading them, txt2img --ckpt FOLDER.

def _convert(*args: str) -> int:
    from tiny_model import load_script
    return load_script("convert").main(list(args))


def _tiny_sd2(folder: Path) -> tuple[Path, Path]:
    """A tiny SD 2-style model (OpenCLIP text tower read at its penultimate block, linear projections, v)."""
    from ldm.checkpoint import save_safetensors
    from ldm.util import instantiate_from_config
    folder.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(folder)
    params = cfg["model"]["params"]
    params["parameterization"] = "v"
    params["unet_config"]["params"].update(num_heads=-1, num_head_channels=16, use_linear_in_transformer=True)
    params["cond_stage_config"] = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                   "params": {"version": None, "layer": "penultimate", "arch_config": OPEN_CLIP_TINY}}
    config = OmegaConf.create(cfg)
    OmegaConf.save(config, folder / "tiny2.yaml")
    model = _randomise(instantiate_from_config(config.model), 5)
    save_safetensors(model.state_dict(), folder / "tiny2.safetensors")
    return folder / "tiny2.yaml", folder / "tiny2.safetensors"


def _our_model(config: Path, ckpt: Path):
    from ldm.checkpoint import load_model_from_config
    return load_model_from_config(OmegaConf.load(config), ckpt)


def _compare_with_pipeline(ours, folder: Path, prompt: str = "a red circle") -> None:
    """diffusers' pipeline, loaded from ``folder``, computes what our model computes (tokenizer included)."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([321])
    with torch.no_grad():
        ctx = ours.cond_stage_model.encode([prompt])
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, ctx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=ctx).sample, ours.apply_model(x, t, ctx),
                                   atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample,
                                   ours.decode_first_stage(x), atol=1e-4, rtol=1e-4)


def _compare_clip_skip(ours, folder: Path, prompt: str = "a red circle") -> None:
    """The web UI's Clip skip N is diffusers' ``clip_skip`` N - 1 (both: the N-th hidden state from the end, then
    the final layer norm); long prompts and weights go through the same path."""
    from ldm.inference import pipeline

    import types

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)
    encoder = pipe.text_encoder
    if not hasattr(encoder, "text_model"):  # transformers 5 flattened CLIPTextModel; diffusers 0.42 still looks
        encoder.__dict__["text_model"] = types.SimpleNamespace(final_layer_norm=encoder.final_layer_norm)  # there
    with torch.no_grad():
        plain = ours.cond_stage_model.encode([prompt])
        for web_ui in (2, 3):
            theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False, clip_skip=web_ui - 1)
            with pipeline.clip_skip(ours, web_ui):
                skipped = ours.cond_stage_model.encode([prompt])
                chunked = ours.cond_stage_model.encode_prompts([prompt])
            torch.testing.assert_close(theirs, skipped, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(chunked, skipped, atol=1e-5, rtol=1e-5)
            assert not torch.allclose(skipped, plain, atol=1e-3)
        torch.testing.assert_close(ours.cond_stage_model.encode([prompt]), plain)  # the setting is back


def test_sd1_checkpoint_to_folder_and_back(tmp_path):
    pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from tiny_model import write_tiny_model
    config, ckpt = write_tiny_model(tmp_path)
    assert _convert(str(ckpt), str(tmp_path / "folder"), "--config", str(config)) == 0
    scheduler = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon" and scheduler["beta_schedule"] == "scaled_linear"
    ours = _our_model(config, ckpt)
    _compare_with_pipeline(ours, tmp_path / "folder")
    _compare_clip_skip(ours, tmp_path / "folder")
    assert _convert(str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--config", str(config)) == 0
    original, back = load_file(str(ckpt)), load_file(str(tmp_path / "back.safetensors"))
    original.pop("cond_stage_model.transformer.text_model.embeddings.position_ids", None)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_sd2_v_checkpoint_to_folder_and_back(tmp_path):
    pytest.importorskip("transformers")
    from ldm.convert.diffusers_folder import family_config, read_diffusers_folder
    from safetensors.torch import load_file
    config, ckpt = _tiny_sd2(tmp_path)
    assert _convert(str(ckpt), str(tmp_path / "folder"), "--config", str(config)) == 0
    text_cfg = json.loads((tmp_path / "folder" / "text_encoder" / "config.json").read_text())
    assert text_cfg["num_hidden_layers"] == 2 and text_cfg["hidden_act"] == "gelu"
    _compare_with_pipeline(_our_model(config, ckpt), tmp_path / "folder")
    read = read_diffusers_folder(tmp_path / "folder")
    assert read.prediction_type == "v_prediction" and read.open_clip
    assert family_config(read, tmp_path / "folder").name == "v2-inference-v.yaml"
    assert _convert(str(tmp_path / "folder"), str(tmp_path / "back.safetensors"), "--config", str(config)) == 0
    original, back = load_file(str(ckpt)), load_file(str(tmp_path / "back.safetensors"))
    unused = {k for k in original if ".resblocks.2." in k or k.endswith(("text_projection", "logit_scale"))}
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], v) for k, v in original.items() if k not in unused)


def test_txt2img_reads_a_diffusers_folder(tmp_path):
    pytest.importorskip("transformers")
    import shutil
    from tiny_model import load_script, model_args, pixels, samples, write_tiny_model
    txt2img = load_script("txt2img")
    tiny = write_tiny_model(tmp_path)
    folder = tmp_path / "tiny-diffusers"
    assert _convert(str(tiny[1]), str(folder), "--config", str(tiny[0])) == 0
    common = ["--prompt", "a red circle", "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    assert txt2img.main(common + model_args(tiny) + ["--outdir", str(tmp_path / "a")]) == 0
    shutil.copy(tiny[0], tmp_path / "tiny-diffusers.yaml")  # the config beside the folder, as for checkpoints
    assert txt2img.main(common + ["--ckpt", str(folder), "--no_safety_check", "--ddim_steps", "2",
                                  "--outdir", str(tmp_path / "b")]) == 0
    (a,), (b,) = samples(tmp_path / "a"), samples(tmp_path / "b")
    assert np.array_equal(pixels(a), pixels(b))


def test_bad_folders_and_outputs_are_one_line_exit_2(tmp_path, capsys):
    from tiny_model import load_script, write_tiny_model
    txt2img = load_script("txt2img")
    config, ckpt = write_tiny_model(tmp_path)
    folder = tmp_path / "folder"
    assert _convert(str(ckpt), str(folder), "--config", str(config)) == 0
    capsys.readouterr()
    assert _convert(str(ckpt), str(folder), "--config", str(config)) == 2
    assert "already exists" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert _convert(str(ckpt), str(tmp_path / "mine"), "--config", str(config), "--force") == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
    assert _convert(str(ckpt), str(folder), "--config", str(config), "--force") == 0
    assert not list(tmp_path.glob(".folder.*"))  # no temporaries or old copies left
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-100])
    capsys.readouterr()
    run = ["--prompt", "x", "--outdir", str(tmp_path / "out"), "--no_safety_check", "--config", str(config)]
    assert txt2img.main(run + ["--ckpt", str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "truncated" in err
    (tmp_path / "plain").mkdir()
    assert txt2img.main(run + ["--ckpt", str(tmp_path / "plain")]) == 2
    assert "folder" in capsys.readouterr().err


def test_bin_weights_are_read_safely_and_v_prediction_needs_a_config(tmp_path):
    from ldm.checkpoint import CheckpointError
    from ldm.convert.diffusers_folder import family_config, read_diffusers_folder
    from safetensors.torch import load_file
    from tiny_model import write_tiny_model
    config, ckpt = write_tiny_model(tmp_path)
    folder = tmp_path / "folder"
    assert _convert(str(ckpt), str(folder), "--config", str(config)) == 0
    expected = read_diffusers_folder(folder).state_dict
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(str(unet)), folder / "unet" / "diffusion_pytorch_model.bin")
    unet.unlink()
    read = read_diffusers_folder(folder)
    assert read.unet_file.name == "diffusion_pytorch_model.bin"
    assert read.state_dict.keys() == expected.keys()
    assert all(torch.equal(read.state_dict[k], v) for k, v in expected.items())
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x02cos\nsystem\nq\x00.")
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.bin"):
        read_diffusers_folder(folder)
    read.prediction_type = "v_prediction"
    from ldm.inference.errors import UsageError
    with pytest.raises(UsageError, match="--config"):
        family_config(read, folder)

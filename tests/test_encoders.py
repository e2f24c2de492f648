"""Text encoders: reference parity (SD1 HF-CLIP, SD2 OpenCLIP), full-size layouts on meta, position_ids loading."""
from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.modules.encoders.clip_text import VIT_L14_TEXT, CLIPTextConfig, load_text_config
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import EOT_TOKEN, SOT_TOKEN, sd1_tokenize
from ldm.util import instantiate_from_config

POSITION_IDS = "transformer.text_model.embeddings.position_ids"
LONG_PROMPT = " ".join(f"word{i}" for i in range(120))


def case(reference_dir, name: str) -> dict:
    return next(c for c in json.loads((reference_dir / "cases.json").read_text()) if c["name"] == name)


def cond_stage_weights(reference_dir, weights: str) -> dict[str, torch.Tensor]:
    sd = load_file(str(reference_dir / weights))
    return {k[len("cond_stage_model."):]: v for k, v in sd.items() if k.startswith("cond_stage_model.")}


def cond_stage_layout(reference_dir, layout: str) -> dict[str, list]:
    full = json.loads((reference_dir / "layouts" / layout).read_text())
    return {k[len("cond_stage_model."):]: v[:2] for k, v in full.items() if k.startswith("cond_stage_model.")}


def layout_of(module: torch.nn.Module) -> dict[str, list]:
    return {k: [list(v.shape), str(v.dtype).replace("torch.", "")] for k, v in module.state_dict().items()}


def tiny_hf(reference_dir) -> FrozenCLIPEmbedder:
    enc = FrozenCLIPEmbedder(version=str(reference_dir / "hf_clip_text"))
    enc.load_state_dict(cond_stage_weights(reference_dir, "ldm_v1.weights.safetensors"), strict=True)
    return enc


@pytest.mark.parametrize("name", ["openclip_text_penultimate", "openclip_text_last"])
def test_openclip_reference(reference_dir, name):
    spec = case(reference_dir, name)
    io = load_file(str(reference_dir / spec["io"]))
    params = dict(OmegaConf.to_container(OmegaConf.load(reference_dir / spec["config"]))["params"])
    arch_config = json.loads((reference_dir / spec["open_clip_model_config"]).read_text())
    enc = FrozenOpenCLIPEmbedder(**params, arch_config=arch_config)  # no registration needed
    enc.load_state_dict(cond_stage_weights(reference_dir, spec["weights"]), strict=True)
    assert torch.equal(enc.tokenize(spec["prompts"]), io["tokens"])
    with torch.no_grad():
        z = enc.encode(spec["prompts"])
    assert z.shape == io["z"].shape
    torch.testing.assert_close(z, io["z"], atol=spec["atol"], rtol=spec["rtol"])


def test_openclip_from_registered_config(reference_dir):
    """As check.py does it: the arch name registered with open_clip, built from the yaml."""
    import open_clip

    spec = case(reference_dir, "openclip_text_last")
    open_clip.add_model_config(str(reference_dir / spec["open_clip_model_config"]))
    enc = instantiate_from_config(OmegaConf.load(reference_dir / spec["config"]))
    enc.load_state_dict(cond_stage_weights(reference_dir, spec["weights"]), strict=True)
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    with torch.no_grad():
        z = enc.encode(spec["prompts"][:1])
    torch.testing.assert_close(z, load_file(str(reference_dir / spec["io"]))["z"][:1], atol=spec["atol"], rtol=1e-4)


def test_hf_clip_reference(reference_dir):
    spec = case(reference_dir, "hf_clip_text")
    io = load_file(str(reference_dir / spec["io"]))
    cfg = OmegaConf.load(reference_dir / spec["config"])
    cfg.params.version = str(reference_dir / spec["hf_text_config_dir"])
    enc = instantiate_from_config(cfg)
    enc.load_state_dict(cond_stage_weights(reference_dir, spec["weights"]), strict=True)
    tokens = enc.tokenize(spec["prompts"])
    assert torch.equal(tokens, io["tokens"])
    assert torch.equal(io["open_clip_tokens"][io["open_clip_tokens"] != 0], tokens[io["open_clip_tokens"] != 0])
    with torch.no_grad():
        z = enc.encode(spec["prompts"])
    torch.testing.assert_close(z, io["z"], atol=spec["atol"], rtol=spec["rtol"])


def test_sd1_tokens_pad_and_truncate_with_eot():
    tokens = sd1_tokenize(["a cat", LONG_PROMPT])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert tokens[0, 0] == SOT_TOKEN and (tokens[0, 3:] == EOT_TOKEN).all()
    assert tokens[1, 0] == SOT_TOKEN and tokens[1, -1] == EOT_TOKEN and (tokens[1, 1:-1] != EOT_TOKEN).all()


@pytest.mark.parametrize("cls", [FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder])
def test_dropped_words(cls):
    with torch.device("meta"):
        enc = cls()
    assert enc.dropped_words("a photograph of an astronaut riding a horse") == ""
    dropped = enc.dropped_words(LONG_PROMPT)
    # word0-word9 take 2 BPE ids, word10.. 3 ids: 75 ids keep word0..word27 and cut word28
    assert dropped == " ".join(f"word{i}" for i in range(28, 120))


def test_sd1_layout_on_meta(reference_dir):
    with torch.device("meta"):
        enc = FrozenCLIPEmbedder()  # "openai/clip-vit-large-patch14": ViT-L/14 text, nothing downloaded
    assert layout_of(enc) == cond_stage_layout(reference_dir, "sd_v1_keys.json")
    assert sum(p.numel() for p in enc.parameters()) == 123_060_480


def test_sd2_layout_on_meta(reference_dir):
    with torch.device("meta"):
        enc = FrozenOpenCLIPEmbedder(layer="penultimate")
    assert next(enc.parameters()).is_meta
    assert layout_of(enc) == cond_stage_layout(reference_dir, "sd_v2_keys.json")
    assert sum(p.numel() for p in enc.parameters()) == 354_032_641


def test_text_config_from_folder_and_clip_config(reference_dir, tmp_path):
    assert load_text_config(reference_dir / "hf_clip_text") == CLIPTextConfig(
        hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4)
    full = {"model_type": "clip", "text_config": {"hidden_size": 64, "num_hidden_layers": 2},
            "text_config_dict": {"num_hidden_layers": 3, "hidden_act": "gelu"}}
    (tmp_path / "config.json").write_text(json.dumps(full))
    got = load_text_config(tmp_path)
    assert (got.hidden_size, got.num_hidden_layers, got.hidden_act) == (64, 3, "gelu")
    assert load_text_config("openai/clip-vit-large-patch14") == VIT_L14_TEXT


def test_position_ids_present_absent_or_corrupt_load_strictly(reference_dir, caplog):
    sd = cond_stage_weights(reference_dir, "ldm_v1.weights.safetensors")
    assert POSITION_IDS in sd
    want = tiny_hf(reference_dir).encode(["a red cube"])
    enc = FrozenCLIPEmbedder(version=str(reference_dir / "hf_clip_text"))
    enc.load_state_dict({k: v for k, v in sd.items() if k != POSITION_IDS}, strict=True)
    assert torch.equal(enc.state_dict()[POSITION_IDS], torch.arange(77)[None])
    torch.testing.assert_close(enc.encode(["a red cube"]), want, atol=0, rtol=0)
    corrupt = dict(sd, **{POSITION_IDS: torch.arange(77, dtype=torch.float32)[None] - 0.001})
    with caplog.at_level(logging.WARNING):
        enc.load_state_dict(corrupt, strict=True)
    assert "does not hold" in caplog.text
    assert torch.equal(enc.state_dict()[POSITION_IDS], torch.arange(77)[None])


def test_sd1_hidden_and_pooled_layers(reference_dir):
    sd = cond_stage_weights(reference_dir, "ldm_v1.weights.safetensors")
    version = str(reference_dir / "hf_clip_text")
    last = tiny_hf(reference_dir)
    hidden = FrozenCLIPEmbedder(version=version, layer="hidden", layer_idx=-1)
    pooled = FrozenCLIPEmbedder(version=version, layer="pooled")
    for enc in (hidden, pooled):
        enc.load_state_dict(sd, strict=True)
    prompts = ["a cat", "a dog on a hill"]
    z_last, z_hidden, z_pooled = last.encode(prompts), hidden.encode(prompts), pooled.encode(prompts)
    torch.testing.assert_close(last.transformer.text_model.final_layer_norm(z_hidden), z_last)
    assert z_pooled.shape == (2, 1, 32)
    torch.testing.assert_close(z_pooled[:, 0], z_last[[0, 1], [3, 6]])  # end-of-text positions
    with pytest.raises(ValueError, match="layer_idx"):
        FrozenCLIPEmbedder(version=version, layer="hidden")


def test_dtype_and_device_follow_parameters(reference_dir):
    enc = tiny_hf(reference_dir).double()
    assert enc.encode("a cat").dtype == torch.float64
    assert enc.device == torch.device("cpu")
    open_cfg = json.loads((reference_dir / "SD-Tiny-Text-32.json").read_text())
    oc = FrozenOpenCLIPEmbedder(version=None, arch_config=open_cfg, layer="penultimate").double()
    z = oc.encode(["a", "b"])
    assert z.shape == (2, 77, 32) and z.dtype == torch.float64


def test_unknown_arch_and_layer_are_clear_errors():
    with pytest.raises(ValueError, match="add_model_config"):
        FrozenOpenCLIPEmbedder(arch="No-Such-Arch")
    with pytest.raises(ValueError, match="layer"):
        FrozenOpenCLIPEmbedder(layer="pooled", arch_config={"embed_dim": 8, "text_cfg": {"width": 8, "heads": 2,
                                                                                          "layers": 1}})


def test_arch_config_from_a_yaml_config_builds_the_text_tower():
    """Configs loaded with OmegaConf pass arch_config as a DictConfig: it must build like a plain dict."""
    from omegaconf import OmegaConf

    arch = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                            "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    plain = FrozenOpenCLIPEmbedder(arch="tiny-test", version=None, arch_config=arch)
    from_yaml = FrozenOpenCLIPEmbedder(arch="tiny-test", version=None, arch_config=OmegaConf.create(arch))
    from_yaml.load_state_dict(plain.state_dict(), strict=True)
    prompts = ["a red circle on a blue background"]
    assert torch.equal(plain.encode(prompts), from_yaml.encode(prompts))

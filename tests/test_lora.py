"""LoRA files (kohya / web-UI and diffusers / PEFT) merged into our model, checked against diffusers' own
``load_lora_weights`` + ``fuse_lora`` on the same weights converted to a diffusers folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import load_model_from_config
from ldm.convert import diffusers_keys as dk
from ldm.convert.diffusers_text import text_to_diffusers
from ldm.convert.diffusers_write import write_folder_contents
from ldm.modules import lora
from ldm.modules.lora.targets import lora_targets
from test_diffusers_convert import _tiny_sd2
from tiny_model import load_script, model_args, pixels, samples, write_tiny_model

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
txt2img = load_script("txt2img")
KINDS = ("to_q", "to_k", "to_v", "to_out", "proj_in", "proj_out", "ff_net", "q_proj", "k_proj", "v_proj",
         "out_proj", "fc1", "fc2", "resnets_0_conv1")


def _factors(shape, rank: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (down, up) for a weight of ``shape`` (LoCon for 3x3 convolutions)."""
    if len(shape) == 4:
        return (torch.randn(rank, *shape[1:], generator=gen) * 0.1, torch.randn(shape[0], rank, 1, 1, generator=gen) * 0.1)
    return torch.randn(rank, shape[1], generator=gen) * 0.1, torch.randn(shape[0], rank, generator=gen) * 0.1


def kohya_lora(model, path: Path, rank: int = 4, alpha: float = 2.0, seed: int = 0) -> Path:
    """A web-UI / kohya LoRA (diffusers module names with underscores) for every adaptable layer kind of ``model``."""
    gen, params, sd = torch.Generator().manual_seed(seed), dict(model.named_parameters()), {}
    for alias, target in lora_targets(model).items():
        ldm_named = alias.startswith(("lora_unet_input_", "lora_unet_middle_", "lora_unet_output_"))
        if not alias.startswith("lora_") or ldm_named or not any(k in alias for k in KINDS):
            continue
        shape = params[target.key].shape
        if target.rows:
            shape = (target.rows[1] - target.rows[0], *shape[1:])
        sd[alias + ".lora_down.weight"], sd[alias + ".lora_up.weight"] = _factors(shape, rank, gen)
        sd[alias + ".alpha"] = torch.tensor(alpha)
    save_file(sd, str(path))
    return path


def _diffusers_pipe(model, config, folder: Path):
    write_folder_contents(model, config, folder)
    return diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None)


def _plain(sd) -> dict[str, torch.Tensor]:
    """A PEFT-wrapped module's weights under their plain names (``x.base_layer.weight`` -> ``x.weight``)."""
    return {k.replace(".base_layer.", "."): v for k, v in sd.items() if ".lora_" not in k}


def _ours_as_diffusers(model, config):
    sd = model.state_dict()
    unet = dk.unet_to_diffusers({k[len(dk.UNET_PREFIX):]: v for k, v in sd.items() if k.startswith(dk.UNET_PREFIX)},
                                config.model.params.unet_config.params)
    text = text_to_diffusers({k[len(dk.TEXT_PREFIX):]: v for k, v in sd.items() if k.startswith(dk.TEXT_PREFIX)})
    return unet, {k[len("text_model."):]: v for k, v in text.items()}


def _tiny(tmp_path: Path):
    config, ckpt = write_tiny_model(tmp_path)
    cfg = OmegaConf.load(config)
    return load_model_from_config(cfg, ckpt), cfg, (config, ckpt)


def test_kohya_lora_with_locon_equals_diffusers_fuse(tmp_path):
    model, cfg, _ = _tiny(tmp_path)
    path = kohya_lora(model, tmp_path / "style.safetensors")
    pipe = _diffusers_pipe(model, cfg, tmp_path / "folder")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = lora.merge_loras(model, [lora.LoraSpec(path, unet_weight=0.7, text_weight=0.4)])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet"], lora_scale=0.7)
    pipe.fuse_lora(components=["text_encoder"], lora_scale=0.4)
    unet, text = _ours_as_diffusers(model, cfg)
    theirs_unet, theirs_text = _plain(pipe.unet.state_dict()), _plain(pipe.text_encoder.state_dict())
    assert unet.keys() == theirs_unet.keys()
    for k, v in unet.items():
        torch.testing.assert_close(v, theirs_unet[k], atol=1e-6, rtol=1e-5)
    for k, v in text.items():
        torch.testing.assert_close(v, theirs_text[k], atol=1e-6, rtol=1e-5)
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) == len(merged.originals) > 40
    assert any(".in_layers.2." in k for k in changed)  # a LoCon factor on a 3x3 convolution
    merged.restore()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_peft_lora_equals_diffusers_fuse(tmp_path):
    model, cfg, _ = _tiny(tmp_path)
    gen, params, sd = torch.Generator().manual_seed(1), dict(model.named_parameters()), {}
    for alias, target in lora_targets(model).items():
        if alias.startswith(("unet.", "text_encoder.")) and alias.endswith(("to_q", "to_v", "q_proj", "fc2")):
            down, up = _factors(params[target.key].shape, 2, gen)
            sd[alias + ".lora_A.weight"], sd[alias + ".lora_B.weight"] = down, up
    save_file(sd, str(tmp_path / "peft.safetensors"))
    pipe = _diffusers_pipe(model, cfg, tmp_path / "folder")
    lora.merge_loras(model, [lora.LoraSpec(tmp_path / "peft.safetensors", 0.8, 0.8)])
    pipe.load_lora_weights(str(tmp_path / "peft.safetensors"))
    pipe.fuse_lora(lora_scale=0.8)
    unet, text = _ours_as_diffusers(model, cfg)
    theirs_unet, theirs_text = _plain(pipe.unet.state_dict()), _plain(pipe.text_encoder.state_dict())
    for k, v in unet.items():
        torch.testing.assert_close(v, theirs_unet[k], atol=1e-6, rtol=1e-5)
    for k, v in text.items():
        torch.testing.assert_close(v, theirs_text[k], atol=1e-6, rtol=1e-5)


def test_sd2_text_lora_lands_in_open_clip_in_proj(tmp_path):
    config, ckpt = _tiny_sd2(tmp_path)
    cfg = OmegaConf.load(config)
    model = load_model_from_config(cfg, ckpt)
    path = kohya_lora(model, tmp_path / "sd2.safetensors", seed=3)
    pipe = _diffusers_pipe(model, cfg, tmp_path / "folder")
    lora.merge_loras(model, [lora.LoraSpec(path, 1.0, 0.9)])
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["text_encoder"], lora_scale=0.9)
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    x, t = torch.randn(1, 4, 16, 16), torch.tensor([500])
    with torch.no_grad():
        ctx = model.cond_stage_model.encode(["a red circle"])
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, ctx, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pipe.unet(x, t, encoder_hidden_states=ctx).sample, model.apply_model(x, t, ctx),
                                   atol=1e-4, rtol=1e-4)


def test_tags_and_flags_parse_as_the_web_ui(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.safetensors").write_bytes(b"")
    (specs,) = [lora.prompt_loras("a <lora:x:0.5> cat, <lora:x:0.2:0.9> <lora:x:te=0.1:unet=2>", tmp_path)]
    assert [(s.text_weight, s.unet_weight) for s in specs] == [(0.5, 0.5), (0.2, 0.9), (0.1, 2.0)]
    assert lora.strip_tags("a <lora:x:0.5> cat, <lora:y> dog") == "a  cat,  dog"
    spec = lora.parse_lora_flag(f"{tmp_path / 'sub' / 'x.safetensors'}:0.6")
    assert spec.path == tmp_path / "sub" / "x.safetensors" and spec.unet_weight == spec.text_weight == 0.6
    with pytest.raises(lora.LoraError, match="no y.safetensors"):
        lora.prompt_loras("<lora:y:1>", tmp_path)
    with pytest.raises(lora.LoraError, match="not a strength"):
        lora.prompt_loras("<lora:x:strong>", tmp_path)


def test_session_switches_loras_between_batches_exactly(tmp_path):
    model, _, _ = _tiny(tmp_path)
    folder = tmp_path / "loras"
    folder.mkdir()
    kohya_lora(model, folder / "a.safetensors", seed=1)
    kohya_lora(model, folder / "b.safetensors", seed=2)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    session = lora.LoraSession(model, (), ["x <lora:a:1>", "y <lora:b:0.5>", "z"], folder)
    assert session.prepare(["x <lora:a:1>"]) == ["x "]
    only_a = {k: v.clone() for k, v in model.state_dict().items()}
    assert session.prepare(["y <lora:b:0.5>"]) == ["y "]
    session.prepare(["x <lora:a:1>"])
    assert all(torch.equal(v, only_a[k]) for k, v in model.state_dict().items())
    session.prepare(["z"])
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())
    with pytest.raises(lora.LoraError, match="one batch"):
        session.prepare(["x <lora:a:1>", "z"])


def test_txt2img_tag_equals_flag_and_keeps_the_prompt(tmp_path, monkeypatch):
    tiny = write_tiny_model(tmp_path)
    model = load_model_from_config(OmegaConf.load(tiny[0]), tiny[1])
    folder = tmp_path / "models-lora"
    folder.mkdir()
    path = kohya_lora(model, folder / "shapes.safetensors", alpha=4.0)
    monkeypatch.setattr("ldm.modules.lora.prompt.DEFAULT_LORA_DIR", folder)
    common = ["--n_samples", "1", "--n_iter", "1", "--skip_grid"] + model_args(tiny)
    prompt = "a red circle, <lora:shapes:0.7>"
    assert txt2img.main(["--prompt", prompt, "--outdir", str(tmp_path / "tag")] + common) == 0
    assert txt2img.main(["--prompt", "a red circle, ", "--lora", f"{path}:0.7", "--outdir", str(tmp_path / "flag")]
                        + common) == 0
    assert txt2img.main(["--prompt", "a red circle, ", "--outdir", str(tmp_path / "none")] + common) == 0
    (tag,), (flag,), (none,) = (samples(tmp_path / d) for d in ("tag", "flag", "none"))
    assert np.array_equal(pixels(tag), pixels(flag))
    assert not np.array_equal(pixels(tag), pixels(none))
    from PIL import Image
    with Image.open(tag) as image:
        assert image.info["parameters"].startswith(prompt)


def test_bad_loras_are_one_line_exit_2(tmp_path, monkeypatch, capsys):
    tiny = write_tiny_model(tmp_path)
    folder = tmp_path / "models-lora"
    folder.mkdir()
    monkeypatch.setattr("ldm.modules.lora.prompt.DEFAULT_LORA_DIR", folder)
    config2, ckpt2 = _tiny_sd2(tmp_path / "sd2")
    kohya_lora(load_model_from_config(OmegaConf.load(config2), ckpt2), folder / "for-sd2.safetensors")
    good = kohya_lora(load_model_from_config(OmegaConf.load(tiny[0]), tiny[1]), tmp_path / "good.safetensors")
    (folder / "cut.safetensors").write_bytes(good.read_bytes()[:-200])
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(2, 4),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(4, 2)}, str(folder / "stray.safetensors"))
    cases = {"<lora:missing:1>": "no missing.safetensors", "<lora:for-sd2:1>": "for-sd2.safetensors",
             "<lora:cut:1>": "truncated", "<lora:stray:1>": "lora_unet_nowhere"}
    for tag, expected in cases.items():
        out = tmp_path / f"out-{len(expected)}"
        assert txt2img.main(["--prompt", f"a circle {tag}", "--outdir", str(out)] + model_args(tiny)) == 2, tag
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
        assert not samples(out)
    assert txt2img.main(["--prompt", "x", "--lora", str(tmp_path / "nope.safetensors"), "--outdir",
                         str(tmp_path / "o")] + model_args(tiny)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_lora_trained_with_diffusers_and_peft_alpha_metadata(tmp_path):
    """A UNet LoRA as diffusers' training scripts save it (PEFT adapter, lora_alpha != r kept in the file's metadata;
    transformers' add_adapter for the text encoder needs a newer peft than the one pinned)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    model, cfg, _ = _tiny(tmp_path)
    pipe = _diffusers_pipe(model, cfg, tmp_path / "folder")
    torch.manual_seed(4)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    diffusers.StableDiffusionPipeline.save_lora_weights(
        str(tmp_path / "trained"), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict())
    path = tmp_path / "trained" / "pytorch_lora_weights.safetensors"
    fresh = _diffusers_pipe(model, cfg, tmp_path / "folder2")
    fresh.load_lora_weights(str(path))
    fresh.fuse_lora(lora_scale=0.6)
    base = {k: v.clone() for k, v in _ours_as_diffusers(model, cfg)[0].items()}
    lora.merge_loras(model, [lora.LoraSpec(path, 0.6, 0.6)])
    unet, text = _ours_as_diffusers(model, cfg)
    assert sum(not torch.equal(v, base[k]) for k, v in unet.items()) == 4 * 2 * 4  # q,k,v,out x attn1,2 x 4 blocks
    theirs_unet, theirs_text = _plain(fresh.unet.state_dict()), _plain(fresh.text_encoder.state_dict())
    for k, v in unet.items():
        torch.testing.assert_close(v, theirs_unet[k], atol=1e-6, rtol=1e-5)
    for k, v in text.items():
        torch.testing.assert_close(v, theirs_text[k], atol=1e-6, rtol=1e-5)


def test_locon_tucker_core_equals_the_three_convolutions():
    """``lora_mid`` (LoCon with a Tucker core): down 1x1, mid kxk, up 1x1 convolutions in a row = one merged kxk."""
    from ldm.modules.lora.files import LoraModule
    down, mid, up = torch.randn(3, 5, 1, 1), torch.randn(3, 3, 3, 3), torch.randn(6, 3, 1, 1)
    module = LoraModule(down=down, up=up, alpha=1.5, mid=mid)
    x = torch.randn(2, 5, 8, 8)
    chained = torch.nn.functional.conv2d(torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, down), mid,
                                                                    padding=1), up) * 1.5 / 3
    merged = torch.nn.functional.conv2d(x, module.delta(torch.Size((6, 5, 3, 3))), padding=1)
    torch.testing.assert_close(merged, chained, atol=1e-4, rtol=1e-4)

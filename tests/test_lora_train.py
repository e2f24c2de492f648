"""LoRA training (ldm.modules.lora.train): adapters on the UNet attention projections, base frozen; the exported
kohya file merged by our loader equals the adapted model, diffusers' load_lora_weights reads it the same way; the
trainer's ``lora:`` hook trains only the adapters, resumes exactly and writes ``last-lora.safetensors``."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_train_helpers import QUIET, ROOT, make_images, one_thread, run_training  # noqa: F401

from ldm.checkpoint import load_model_from_config
from ldm.modules import lora
from ldm.modules.lora.train import LoraTrainConfig, add_lora, lora_config, save_kohya
from ldm.training.config import load_config
from tiny_model import write_tiny_model

LORA_SD1 = ROOT / "configs" / "training" / "lora-sd1.yaml"


def _inputs(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=gen)
    with torch.no_grad():
        ctx = model.get_learned_conditioning(["a red circle", "a blue square"])
    return x, torch.tensor([10, 700]), ctx


def _randomise_adapters(model, seed: int = 1) -> None:
    """Stand-in for training: non-zero up factors."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lora_up.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _tiny(tmp_path):
    config, ckpt = write_tiny_model(tmp_path)
    cfg = OmegaConf.load(config)
    return cfg, (config, ckpt)


def test_adapters_start_at_the_base_and_only_they_train(tmp_path):
    cfg, _ = _tiny(tmp_path)
    model = load_model_from_config(cfg, _[1])
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        base = model.apply_model(x, t, ctx)
    params = add_lora(model, LoraTrainConfig(rank=2, alpha=4.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # to_q/k/v/out x (attn1, attn2) x 3 transformer blocks (down, middle, up at the attention resolution) x 2 factors
    assert len(trainable) == len(params) and all(".lora_down." in n or ".lora_up." in n for n in trainable)
    assert len({n.rsplit(".lora_", 1)[0] for n in trainable}) == len(trainable) // 2 >= 8
    with torch.no_grad():
        torch.testing.assert_close(model.apply_model(x, t, ctx), base, atol=0, rtol=0)
    model.train()
    loss = model.apply_model(x, t, ctx).square().mean()
    loss.backward()
    assert all(p.grad is not None for p in params)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    with pytest.raises(ValueError, match="unknown"):
        lora_config({"rank": 4, "rnak": 2})
    with pytest.raises(ValueError, match="match no attention"):
        add_lora(load_model_from_config(cfg, _[1]), LoraTrainConfig(modules=("to_qq",)))


def test_exported_kohya_lora_merges_to_the_adapted_model_and_diffusers_reads_it(tmp_path):
    pytest.importorskip("diffusers")
    pytest.importorskip("peft")
    from test_lora import _diffusers_pipe

    cfg, (_, ckpt) = _tiny(tmp_path)
    base_model = load_model_from_config(cfg, ckpt)
    pipe = _diffusers_pipe(base_model, cfg, tmp_path / "folder")  # the base, converted, before any adapter
    model = load_model_from_config(cfg, ckpt)
    add_lora(model, LoraTrainConfig(rank=3, alpha=1.5))
    _randomise_adapters(model)
    model.eval()
    x, t, ctx = _inputs(model)
    with torch.no_grad():
        adapted = model.apply_model(x, t, ctx)
        unadapted = base_model.apply_model(x, t, ctx)
    path = save_kohya(model, tmp_path / "out" / "mine.safetensors")
    keys = set(load_file(str(path)))
    assert any(k.endswith("_attn2_to_q.lora_down.weight") and k.startswith("lora_unet_down_blocks_") for k in keys)
    assert any(k.endswith("_attn1_to_out_0.lora_up.weight") for k in keys)
    assert any(k.endswith("_to_v.alpha") for k in keys)
    lora.merge_loras(base_model, [lora.LoraSpec(path)])
    with torch.no_grad():
        merged = base_model.apply_model(x, t, ctx)
    assert (adapted - unadapted).abs().max() > 1e-3  # the adapters do change the output
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    pipe.load_lora_weights(str(path))
    pipe.fuse_lora(components=["unet"], lora_scale=1.0)
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
    torch.testing.assert_close(theirs, adapted, atol=1e-4, rtol=1e-4)


def _lora_run_config(tmp_path, data, steps: int, extra=()):
    config, ckpt = write_tiny_model(tmp_path / "base")
    return load_config([config, LORA_SD1], [
        f"model.params.ckpt_path={ckpt}", f"data.params.train.params.root={data}", "data.params.train.params.size=32",
        "data.params.num_workers=0", "data.params.batch_size=2", f"trainer.max_steps={steps}",
        "trainer.precision=32", "trainer.checkpoint_every_n_steps=2", "trainer.image_log_every_n_steps=0",
        "lora.rank=2", "lora.dropout=0.1", "model.base_learning_rate=1e-3", *QUIET, *extra])


def test_trainer_lora_section_trains_adapters_resumes_exactly_and_exports(tmp_path):
    data = tmp_path / "data"
    make_images(data, 6, size=(32, 32))
    cfg = _lora_run_config(tmp_path, data, 4)
    straight = run_training(cfg, tmp_path / "straight")
    out = tmp_path / "straight" / "checkpoints" / "last-lora.safetensors"
    exported = load_file(str(out))
    ups = [v for k, v in exported.items() if k.endswith(".lora_up.weight")]
    assert ups and all(v.abs().sum() > 0 for v in ups)  # trained away from zero
    base = load_file(str(cfg.model.params.ckpt_path))
    sd = straight.model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in base.items() if k in sd)  # the base stayed frozen
    opt = straight.task.slots[0].optimizer
    assert sum(len(g["params"]) for g in opt.param_groups) == len(ups) * 2
    first = run_training(_lora_run_config(tmp_path, data, 2), tmp_path / "halves")
    assert first.step == 2
    resumed = run_training(_lora_run_config(tmp_path, data, 4), tmp_path / "halves",
                           resume=tmp_path / "halves" / "checkpoints" / "last.ckpt")
    assert resumed.step == 4
    again = load_file(str(tmp_path / "halves" / "checkpoints" / "last-lora.safetensors"))
    assert again.keys() == exported.keys()
    for k, v in exported.items():
        torch.testing.assert_close(again[k], v, atol=1e-6, rtol=1e-5)
    # --export_lora: the same file from a checkpoint, names from the config's UNet layout (no model built)
    from test_train_helpers import load_train_script
    train = load_train_script()
    ckpt, out = tmp_path / "straight" / "checkpoints" / "last.ckpt", tmp_path / "from-ckpt.safetensors"
    assert train.main(["--export_lora", str(ckpt), str(out)]) == 0
    from_ckpt = load_file(str(out))
    assert from_ckpt.keys() == exported.keys() and all(torch.equal(from_ckpt[k], v) for k, v in exported.items())
    assert train.main(["--export_lora", str(ckpt), str(out)]) == 2  # exists: only with --force
    assert train.main(["--export_lora", str(ckpt), str(out), "--force"]) == 0
    assert train.main(["--export_lora", str(ckpt), str(tmp_path / "x.ckpt")]) == 2


@pytest.mark.parametrize("inference, lora_config_file", [("v1-inference.yaml", "lora-sd1.yaml"),
                                                         ("v2-inference.yaml", "lora-sd2.yaml")])
def test_lora_configs_fit_the_sd_inference_configs(tmp_path, inference, lora_config_file):
    from ldm.training.config import check_complete, check_sections, trainer_settings

    files = [ROOT / "configs" / "stable-diffusion" / inference, ROOT / "configs" / "training" / lora_config_file]
    with pytest.raises(ValueError, match="ckpt_path"):
        check_complete(load_config(files))
    cfg = load_config(files, ["model.params.ckpt_path=/models/base.safetensors",
                              f"data.params.train.params.root={tmp_path}"])
    check_sections(cfg)
    check_complete(cfg)
    trainer_settings(cfg)
    settings = lora_config(cfg.lora)
    assert settings.modules == ("to_q", "to_k", "to_v", "to_out.0") and settings.rank == 8
    assert cfg.model.params.use_ema is False and cfg.model.params.scheduler_config is None


def test_bad_lora_section_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    from test_train_helpers import TINY, load_train_script

    make_images(tmp_path / "data", 4, size=(32, 32))
    train = load_train_script()
    common = ["-t", "--base", str(TINY["ldm"]), "--logdir", str(tmp_path / "logs"),
              f"data.params.train.params.root={tmp_path / 'data'}", *QUIET]
    for bad, expected in (("lora.rnak=4", "rnak"), ("lora.modules=[to_x]", "match no attention"),
                          ("lora.rank=0", "positive")):
        assert train.main([*common, bad]) == 2, bad
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tmp_path):
    """The SD inference configs set use_checkpoint: the frozen base must not break the recomputed backward pass."""
    cfg, (_, ckpt) = _tiny(tmp_path)
    grads = []
    for flag in (False, True):
        cfg.model.params.unet_config.params.use_checkpoint = flag
        torch.manual_seed(0)
        model = load_model_from_config(cfg, ckpt)
        params = add_lora(model, LoraTrainConfig(rank=2, dropout=0.2))
        _randomise_adapters(model)
        model.train()
        x, t, ctx = _inputs(model)
        torch.manual_seed(1)
        model.apply_model(x, t, ctx).square().mean().backward()
        grads.append([p.grad for p in params])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)

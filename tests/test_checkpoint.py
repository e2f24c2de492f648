"""Checkpoint reading and loading: safety, wrappers, EMA selection, ignorable keys and mismatch reports."""
from __future__ import annotations

import os
import pickle
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import (IGNORABLE_UNEXPECTED, CheckpointError, apply_ema, ema_key, has_ema, load_state_dict_file,
                            load_weights, read_checkpoint, save_safetensors)


class Unet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.input_blocks = torch.nn.Sequential(torch.nn.Linear(3, 4))
        self.out = torch.nn.Linear(4, 2)


class Wrapper(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.diffusion_model = Unet()


class Tiny(torch.nn.Module):
    """A model with the LatentDiffusion key layout in miniature."""

    def __init__(self):
        super().__init__()
        self.model = Wrapper()
        self.first_stage_model = torch.nn.Linear(2, 2)
        self.register_buffer("betas", torch.linspace(0.1, 0.2, 5))


def full_sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in list(sd.items()):
        if k.startswith("model."):
            sd[ema_key(k)] = v + 1.0
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    return sd


def test_ema_key_convention():
    assert ema_key("model.diffusion_model.input_blocks.0.0.weight") == "model_ema.diffusion_modelinput_blocks00weight"
    with pytest.raises(ValueError):
        ema_key("first_stage_model.x")


def test_safetensors_and_ckpt_with_wrapper(tmp_path):
    m = Tiny()
    sd = m.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "m.safetensors")
    torch.save({"state_dict": sd, "global_step": 7, "epoch": 1}, tmp_path / "m.ckpt")
    torch.save(sd, tmp_path / "flat.pt")
    for name in ("m.safetensors", "m.ckpt", "flat.pt"):
        got = load_state_dict_file(tmp_path / name)
        assert set(got) == set(sd)
        assert all(torch.equal(got[k], sd[k]) for k in sd)
    assert read_checkpoint(tmp_path / "m.ckpt")[1]["global_step"] == 7


def test_lightning_callbacks_load_without_lightning(tmp_path):
    """Real SD .ckpt files pickle Lightning callback classes; they must load with no Lightning installed."""
    mod_name = "pytorch_lightning.callbacks.model_checkpoint"
    fake_pkgs = {n: types.ModuleType(n) for n in ("pytorch_lightning", "pytorch_lightning.callbacks", mod_name)}

    class ModelCheckpoint:  # stands for the real class while pickling
        def __init__(self):
            self.best_model_path = "x"

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = mod_name, "ModelCheckpoint"
    fake_pkgs[mod_name].ModelCheckpoint = ModelCheckpoint
    sys.modules.update(fake_pkgs)
    try:
        sd = Tiny().state_dict()
        torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: {"best_model_score": None}},
                    "hparams": ModelCheckpoint()}, tmp_path / "pl.ckpt")
    finally:
        for n in fake_pkgs:
            sys.modules.pop(n, None)
    assert "pytorch_lightning" not in sys.modules
    got, extra = read_checkpoint(tmp_path / "pl.ckpt")
    assert set(got) == set(sd)
    assert "callbacks" in extra


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    _Evil.marker = tmp_path / "pwned"
    with open(tmp_path / "evil.ckpt", "wb") as f:
        pickle.dump({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, f, protocol=2)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Evil()}, tmp_path / "evil_zip.ckpt")
    for name in ("evil.ckpt", "evil_zip.ckpt"):
        with pytest.raises(CheckpointError, match="refusing to load"):
            load_state_dict_file(tmp_path / name)
    assert not _Evil.marker.exists()


@pytest.mark.parametrize("content,match", [(b"", "cannot read"), (b"not a checkpoint at all", "cannot read")])
def test_corrupt_files_give_clear_errors(tmp_path, content, match):
    for suffix in (".ckpt", ".safetensors"):
        p = tmp_path / f"bad{suffix}"
        p.write_bytes(content)
        with pytest.raises(CheckpointError, match=match):
            load_state_dict_file(p)


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict_file(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="folder"):
        load_state_dict_file(tmp_path)


def test_full_checkpoint_ema_choice():
    src = Tiny()
    sd = full_sd(src)
    assert has_ema(sd)
    raw, ema = Tiny(), Tiny()
    assert not load_weights(raw, dict(sd), use_ema=False).used_ema
    assert load_weights(ema, dict(sd), use_ema=True).used_ema
    k = "model.diffusion_model.out.weight"
    assert torch.equal(raw.state_dict()[k], src.state_dict()[k])
    assert torch.equal(ema.state_dict()[k], src.state_dict()[k] + 1.0)
    # default: EMA when present
    default = Tiny()
    assert load_weights(default, dict(sd)).used_ema


def test_incomplete_ema_is_an_error():
    sd = full_sd(Tiny())
    del sd[ema_key("model.diffusion_model.out.bias")]
    with pytest.raises(CheckpointError, match="EMA weights are incomplete"):
        apply_ema(sd)


def test_ema_only_release_with_scalars_loads():
    sd = {k: v.clone() for k, v in Tiny().state_dict().items()}
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(3)
    rep = load_weights(Tiny(), sd)
    assert set(rep.ignored) == {"model_ema.decay", "model_ema.num_updates"}


def test_ignorable_list_is_explicit_and_used():
    m = Tiny()
    for key in IGNORABLE_UNEXPECTED:
        sd = dict(m.state_dict())
        sd[key] = torch.zeros(1)
        assert key in load_weights(m, sd).ignored
    sd = dict(m.state_dict())
    sd["model.diffusion_model.surprise.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match="1 unexpected keys"):
        load_weights(m, sd)


def test_mismatch_report_counts_and_hint():
    m = Tiny()
    sd = dict(m.state_dict())
    del sd["model.diffusion_model.out.bias"]
    sd["model.diffusion_model.out.weight"] = torch.zeros(5, 5)
    sd["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.zeros(768)
    sd["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(320, 4, 3, 3)
    with pytest.raises(CheckpointError) as info:
        load_weights(m, sd, source="checkpoint 'x.ckpt'")
    msg = str(info.value)
    assert "1 missing keys" in msg and "model.diffusion_model.out.bias" in msg
    assert "2 unexpected keys" in msg
    assert "1 keys with the wrong shape" in msg and "[5, 5]" in msg
    assert "v1-inference.yaml" in msg


def test_save_safetensors_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "w.safetensors"
    save_safetensors({"a": torch.ones(2)}, target)
    import safetensors.torch

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError):
        save_safetensors({"a": torch.zeros(2)}, target)
    assert torch.equal(load_state_dict_file(target)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_save_safetensors_mode_and_planted_links(tmp_path):
    """The usual file mode (not safetensors' 0600), and a link planted at the old predictable temporary name is
    neither followed nor removed."""
    import os

    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    target = tmp_path / "w.safetensors"
    planted = tmp_path / f".{target.name}.tmp-{os.getpid()}"
    planted.symlink_to(victim)
    old = os.umask(0o022)
    try:
        save_safetensors({"a": torch.ones(2)}, target)
    finally:
        os.umask(old)
    assert target.stat().st_mode & 0o777 == 0o644 and victim.read_text() == "keep" and planted.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, victim.name, planted.name])

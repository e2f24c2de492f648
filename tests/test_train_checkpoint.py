"""Checkpoint writing: atomic (a crash or kill mid-write keeps the previous file), pruning, RNG state, EMA export."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train_helpers import (ROOT, load_train_script, make_images, one_thread, run_training,  # noqa: F401
                                tiny_config)

from ldm.training import checkpoint as ckpt_io


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    ckpt_io.atomic_save({"global_step": 1, "w": torch.ones(3)}, last)
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt_io.atomic_save({"global_step": 2}, last)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(last, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # the temporary file is gone


def test_killed_writer_leaves_the_previous_checkpoint_loadable(tmp_path):
    marker = tmp_path / "writing"
    script = textwrap.dedent(f"""
        import os, sys, time, torch
        sys.path.insert(0, {str(ROOT)!r})
        from ldm.training import checkpoint as ckpt_io
        ckpt_io.write_checkpoint({{"global_step": 1, "w": torch.zeros(1000)}}, __import__("pathlib").Path({str(tmp_path)!r}), 1, numbered=False)
        def stall(fd):
            open({str(marker)!r}, "w").close()
            time.sleep(60)
        os.fsync = stall
        ckpt_io.write_checkpoint({{"global_step": 2, "w": torch.ones(1000)}}, __import__("pathlib").Path({str(tmp_path)!r}), 2, numbered=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.time() + 60
        while not marker.exists():
            assert proc.poll() is None and time.time() < deadline, "the writer did not reach the write"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)  # killed while the new checkpoint is written but not yet in place
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 1 and torch.equal(ckpt["w"], torch.zeros(1000))
    leftovers = [p for p in tmp_path.glob(".*.tmp-*")]
    assert leftovers  # the unfinished write ...
    ckpt_io.remove_stale_temporaries(tmp_path)
    assert not list(tmp_path.glob(".*.tmp-*"))  # ... is cleaned up when training starts again


def test_numbered_checkpoints_link_last_and_prune(tmp_path):
    for step in (2, 4, 6):
        ckpt_io.write_checkpoint({"global_step": step}, tmp_path, step, numbered=True, keep=2)
    assert [p.name for p in ckpt_io.step_checkpoints(tmp_path)] == ["step-00000004.ckpt", "step-00000006.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 6


def test_rng_states_round_trip_through_a_safe_checkpoint(tmp_path):
    gen = torch.Generator().manual_seed(5)
    prng = np.random.RandomState(7)
    extra = {"g": gen, "ucg": prng}
    state = ckpt_io.rng_state(extra)
    ckpt_io.atomic_save({"rng": state}, tmp_path / "r.ckpt")

    def draws():
        return (torch.rand(3).tolist(), np.random.rand(2).tolist(), random.random(),
                torch.rand(2, generator=gen).tolist(), prng.rand(2).tolist())

    first = draws()
    loaded = torch.load(tmp_path / "r.ckpt", weights_only=True)["rng"]
    ckpt_io.set_rng_state(loaded, extra)
    assert draws() == first


def test_inference_export_replaces_weights_by_their_ema(tmp_path):
    sd = {"model.diffusion_model.a.weight": torch.zeros(2), "model_ema.diffusion_modelaweight": torch.ones(2),
          "model_ema.decay": torch.tensor(0.99), "model_ema.num_updates": torch.tensor(3, dtype=torch.int),
          "first_stage_model.w": torch.full((1,), 5.0), "betas": torch.rand(4)}
    torch.save({"state_dict": sd, "global_step": 3}, tmp_path / "last.ckpt")
    script = load_train_script()
    assert script.main(["--export_ema", str(tmp_path / "last.ckpt"), str(tmp_path / "ema.safetensors")]) == 0
    out = load_file(str(tmp_path / "ema.safetensors"))
    assert set(out) == {"model.diffusion_model.a.weight", "first_stage_model.w", "betas"}
    assert torch.equal(out["model.diffusion_model.a.weight"], torch.ones(2))


def test_crash_while_checkpointing_in_training_then_resume(tmp_path, monkeypatch):
    make_images(tmp_path / "img", 4)
    overrides = ["trainer.checkpoint_every_n_steps=2", "trainer.val_every_n_steps=0", "data.params.batch_size=2",
                 "trainer.image_log_every_n_steps=0", "trainer.max_steps=4"]
    cfg = tiny_config("ae", tmp_path / "img", overrides)
    real = ckpt_io.atomic_save
    calls = []

    def flaky(obj, path):
        calls.append(path)
        if obj.get("global_step") == 4:
            raise KeyboardInterrupt  # the process dies in the middle of writing step 4
        real(obj, path)

    monkeypatch.setattr(ckpt_io, "atomic_save", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, tmp_path / "run")
    monkeypatch.setattr(ckpt_io, "atomic_save", real)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 2
    trainer = run_training(cfg, tmp_path / "run", resume=last)
    assert trainer.step == 4 and torch.load(last, weights_only=True)["global_step"] == 4
    assert os.path.exists(tmp_path / "run" / "checkpoints" / "step-00000004.ckpt")


def test_temporary_names_are_unpredictable_and_never_follow_a_planted_link(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    names = {ckpt_io._tmp_path(target).name for _ in range(20)}
    assert len(names) == 20 and all(n.startswith(".last.ckpt.tmp-") for n in names)
    victim = tmp_path / "victim.txt"
    victim.write_text("user data")
    planted = tmp_path / ".last.ckpt.tmp-guessed"
    planted.symlink_to(victim)
    monkeypatch.setattr(ckpt_io, "_tmp_path", lambda path: planted)  # as if the name had been guessed
    for write in (lambda: ckpt_io.atomic_save({"w": torch.ones(2)}, target),
                  lambda: ckpt_io.atomic_write_bytes(b"x", target),
                  lambda: ckpt_io.atomic_save_safetensors({"w": torch.ones(2)}, target, {})):
        with pytest.raises(FileExistsError):
            write()
        assert victim.read_text() == "user data" and not target.exists()
        assert planted.is_symlink()  # not this process's file: left alone

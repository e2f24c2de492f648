"""scripts/train.py end to end: a run from --base with overrides, then --resume of its folder; torchrun (slow)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from test_train_helpers import (QUIET, ROOT, TINY, load_train_script, make_images, one_thread,  # noqa: F401
                                read_metrics)


def test_cli_trains_then_resumes_from_the_run_folder(tmp_path):
    make_images(tmp_path / "img", 6)
    script = load_train_script()
    overrides = [f"data.params.train.params.root={tmp_path / 'img'}", "trainer.max_steps=2",
                 "trainer.image_log_every_n_steps=0", "trainer.val_every_n_steps=0", "trainer.log_every_n_steps=1",
                 "data.params.batch_size=2", "model.base_learning_rate=2e-4", *QUIET]
    assert script.main(["--base", str(TINY["ae"]), "-t", "--logdir", str(tmp_path / "logs"), "--name", "cli",
                        "--seed", "4", *overrides]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    assert run.name.endswith("_cli") and (run / "train.log").exists()
    saved = list((run / "configs").glob("*-project.yaml"))
    assert len(saved) == 1 and "0.0002" in saved[0].read_text()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(2e-4 * 2)  # --scale_lr default
    assert script.main(["--resume", str(run), "-t", "--seed", "4", "trainer.max_steps=3"]) == 0
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    assert sorted(read_metrics(run, "train/total_loss")) == [1, 2, 3]


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path):
    make_images(tmp_path / "img", 24, size=(32, 32))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "train.py"), "--base", str(TINY["ae"]), "-t", "--logdir", str(tmp_path / "logs"),
           f"data.params.train.params.root={tmp_path / 'img'}", "trainer.max_steps=2", "data.params.batch_size=2",
           "trainer.image_log_every_n_steps=0", "trainer.val_every_n_steps=0", *QUIET]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "logs").iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 2

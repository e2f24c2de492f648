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


def test_torchrun_two_processes_as_the_readme_writes_it(tmp_path):
    """configs/training/README.md's torchrun form (options, then --base files, then overrides), 2 gloo processes."""
    make_images(tmp_path / "img", 24, size=(32, 32))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "scripts" / "train.py"), "-t", "--logdir", str(tmp_path / "logs"), "--base", str(TINY["ae"]),
           f"data.params.train.params.root={tmp_path / 'img'}", "trainer.max_steps=2", "data.params.batch_size=2",
           "trainer.image_log_every_n_steps=0", "trainer.val_every_n_steps=0", *QUIET]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    (run,) = (tmp_path / "logs").iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["global_step"] == 2


def _write_shard(path, start: int, n: int) -> None:
    """A webdataset-style shard: ``key.png`` + ``key.txt`` per sample."""
    import io
    import tarfile

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(start)
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            buf = io.BytesIO()
            Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(buf, format="PNG")
            for name, payload in ((f"s{i:04d}.png", buf.getvalue()), (f"s{i:04d}.txt", f"cap {i}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def test_tar_shards_by_override_from_the_image_folder_config(tmp_path, caplog):
    """The image-folder config trains on tar shards with two overrides: its unset root is dropped and the
    validation_fraction split (folders only) is left out with a warning."""
    (tmp_path / "shards").mkdir()
    for k in range(2):
        _write_shard(tmp_path / "shards" / f"data-{k:02d}.tar", 10 * k, 4)
    script = load_train_script()
    args = ["--base", str(TINY["ldm"]), "-t", "--logdir", str(tmp_path / "logs"),
            "data.params.train.target=ldm.data.tar_shards.TarShardDataset",
            f"data.params.train.params.urls={tmp_path / 'shards'}/data-{{00..01}}.tar", "trainer.max_steps=2",
            "data.params.batch_size=2", "trainer.image_log_every_n_steps=0", "trainer.val_every_n_steps=0", *QUIET]
    assert script.main(args) == 0
    assert "cannot be split by a fraction" in caplog.text
    (run,) = (tmp_path / "logs").iterdir()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2 and ckpt["rank_states"][0]["data"]["samples"] == 4

"""Shared helpers of the training tests (tiny configs, generated images) and tests of the config handling."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from PIL import Image

from ldm.training.config import (TrainerSettings, base_learning_rate, effective_learning_rate, load_config,
                                 model_config, normalize_precision, trainer_settings)

ROOT = Path(__file__).resolve().parents[1]
TINY = {"ldm": ROOT / "configs" / "training" / "tiny-ldm.yaml",
        "ae": ROOT / "configs" / "training" / "tiny-autoencoder.yaml"}
QUIET = ["trainer.progress_bar=false", "trainer.tensorboard=false"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: the tiny models gain nothing from more, and on a shared CPU they lose a lot."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_images(root: Path, n: int, size: tuple[int, int] = (40, 48), captions: str = "sidecar",
                corrupt: int = 0, seed: int = 0) -> list[str]:
    """Write ``n`` random PNGs (``size`` = (w, h)) with captions (sidecar .txt or metadata.jsonl) and ``corrupt``
    unreadable files; returns the file names of the good images."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names, records = [], []
    for i in range(n):
        name = f"img{i:03d}.png"
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(root / name)
        caption = f"a photo of thing {i}"
        if captions == "sidecar":
            (root / f"img{i:03d}.txt").write_text(caption)
        else:
            records.append({"file_name": name, "text": caption})
        names.append(name)
    for i in range(corrupt):
        (root / f"zz_corrupt{i}.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
    if records:
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return names


def tiny_config(kind: str, data_root: Path, overrides: Sequence[str] = ()) -> Any:
    """The tiny training config of ``kind`` ("ldm" or "ae") reading images from ``data_root``."""
    return load_config([TINY[kind]], [f"data.params.train.params.root={data_root}", *QUIET, *overrides])


def run_training(cfg: Any, logdir: Path, seed: int = 0, resume: Path | None = None,
                 callbacks: Sequence[Any] = ()) -> Any:
    """Build a single-process CPU trainer for ``cfg`` and train; returns the trainer."""
    from ldm.training.distributed import DistContext
    from ldm.training.trainer import RunOptions, Trainer

    trainer = Trainer(cfg, RunOptions(logdir=logdir, seed=seed, scale_lr=False, resume=resume,
                                      callbacks=list(callbacks)), DistContext())
    trainer.fit()
    return trainer


def load_train_script() -> Any:
    """``scripts/train.py`` as a module."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("train_script", ROOT / "scripts" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_metrics(logdir: Path, key: str) -> dict[int, float]:
    """``step -> value`` of one column of ``metrics.csv``."""
    import csv
    with open(logdir / "metrics.csv") as f:
        return {int(r["step"]): float(r[key]) for r in csv.DictReader(f) if r.get(key)}


# ------------------------------------------------------------------------------------------------ config tests
def test_merge_order_and_dotted_overrides(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("model:\n  base_learning_rate: 1.0e-4\n  target: x.Y\n  params: {p: 1, q: 2}\ndata: {}\n")
    b.write_text("model:\n  params: {q: 3}\n")
    cfg = load_config([a, b], ["model.params.p=7", "model.base_learning_rate=5e-5"])
    assert cfg.model.params.p == 7 and cfg.model.params.q == 3
    assert base_learning_rate(cfg) == pytest.approx(5e-5)
    assert "base_learning_rate" not in model_config(cfg)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match="nope.yaml"):
        load_config([tmp_path / "nope.yaml"])
    good = tmp_path / "g.yaml"
    good.write_text("model: {target: a.B}\ndata: {}\n")
    with pytest.raises(ValueError, match="key.sub=value"):
        load_config([good], ["model.params.x"])
    with pytest.raises(ValueError, match="precision"):
        normalize_precision("fp8")


def test_lightning_sections_of_original_configs_are_understood(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("""
model: {target: a.B}
data: {}
lightning:
  callbacks:
    image_logger: {target: main.ImageLogger, params: {batch_frequency: 750, max_images: 3}}
  modelcheckpoint: {params: {every_n_train_steps: 500}}
  trainer: {benchmark: true, max_steps: 1234, accumulate_grad_batches: 2, precision: 16, val_check_interval: 0.5}
trainer: {gradient_clip_val: 1.0}
""")
    s = trainer_settings(load_config([p]))
    assert (s.max_steps, s.accumulate_grad_batches, s.precision) == (1234, 2, "16")
    assert (s.image_log_every_n_steps, s.log_images, s.checkpoint_every_n_steps) == (750, 3, 500)
    assert s.gradient_clip_val == 1.0 and s.val_every_n_steps == 0


def test_scale_lr_rule():
    assert effective_learning_rate(1e-4, 4, 2, 8, scale_lr=True) == pytest.approx(2 * 8 * 4 * 1e-4)
    assert effective_learning_rate(1e-4, 4, 2, 8, scale_lr=False) == 1e-4
    with pytest.raises(ValueError):
        TrainerSettings(accumulate_grad_batches=0)


def test_cli_options_and_run_folders(tmp_path):
    script = load_train_script()
    args = script.parse_args(["--base", "a.yaml", "b.yaml", "-t", "--name", "run", "--seed", "5", "--scale_lr",
                              "false", "model.base_learning_rate=1e-5", "--logdir", str(tmp_path)])
    assert args.base == ["a.yaml", "b.yaml"] and args.train and args.seed == 5 and not args.scale_lr
    assert args.overrides == ["model.base_learning_rate=1e-5"]
    files, logdir, ckpt = script.resolve_run(args)
    assert ckpt is None and logdir.parent == tmp_path and logdir.name.endswith("_run")
    run = tmp_path / "2024_run"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "2024-project.yaml").write_text("model: {}\n")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    files, logdir, ckpt = script.resolve_run(script.parse_args(["--resume", str(run)]))
    assert logdir == run and ckpt == run / "checkpoints" / "last.ckpt" and files[0].name == "2024-project.yaml"


def test_tiny_configs_are_valid(tmp_path):
    for kind in TINY:
        cfg = tiny_config(kind, tmp_path)
        s = trainer_settings(cfg)
        assert s.max_steps >= 1 and cfg.data.params.batch_size >= 1
        assert model_config(cfg)["target"].startswith("ldm.models.")


def test_real_example_configs_merge_and_name_what_is_missing():
    from ldm.training.config import check_complete

    files = [ROOT / "configs" / "stable-diffusion" / "v2-inference.yaml", ROOT / "configs" / "training" /
             "sd2-finetune.yaml"]
    cfg = load_config(files)
    with pytest.raises(ValueError, match="model.params.ckpt_path"):
        check_complete(cfg)
    cfg = load_config(files, ["model.params.ckpt_path=/m.ckpt", "data.params.train.params.urls=/d/{0..9}.tar"])
    check_complete(cfg)
    params = model_config(cfg)["params"]
    assert params["use_ema"] is True and params["unet_config"]["params"]["model_channels"] == 320
    assert params["scheduler_config"]["target"] == "ldm.lr_scheduler.LambdaLinearScheduler"
    assert trainer_settings(cfg).precision == "bf16"
    ae = load_config([ROOT / "configs" / "training" / "autoencoder-kl-f8.yaml"], ["data.params.train.params.root=/x"])
    assert base_learning_rate(ae) == pytest.approx(4.5e-6) and trainer_settings(ae).accumulate_grad_batches == 2

"""Ctrl-C (SIGINT) during a training step: the step finishes, last.ckpt is saved, exit 130, and resuming gives
bit for bit the run that was never interrupted."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch
from test_train_helpers import QUIET, ROOT, TINY, load_train_script, make_images, one_thread  # noqa: F401

# Runs scripts/train.py in a fresh interpreter (one thread, like the in-process runs of the test); with a marker
# path, the batch fetch of step 3 announces itself there and waits until the signal is sent: it lands in the middle
# of the step (data position already moved on).
DRIVER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch
    torch.set_num_threads(1)
    from ldm.training import trainer as tr
    marker = sys.argv[1]
    if marker:
        fetch = tr.Trainer._batches
        def slow(self, it):
            batches = fetch(self, it)
            if self.step == 3:
                open(marker, "w").close()
                deadline = time.time() + 60
                while not os.path.exists(marker + ".sent") and time.time() < deadline:
                    time.sleep(0.05)  # the signal arrives while this step's batch is in hand
            return batches
        tr.Trainer._batches = slow
    import importlib.util
    spec = importlib.util.spec_from_file_location("train", {root!r} + "/scripts/train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    sys.exit(train.main(sys.argv[2:]))
""").format(root=str(ROOT))


def _train(args: list[str], marker: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", DRIVER, str(marker or ""), *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=240)
    return proc.returncode, err


def _same(a: Any, b: Any, where: str = "") -> list[str]:
    """Paths at which two checkpoint trees differ (tensors compared bit for bit)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) != set(b):
            return [where]
        return [d for k in a for d in _same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if not isinstance(b, (list, tuple)) or len(a) != len(b):
            return [where]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def test_sigint_finishes_the_step_and_resume_is_bit_identical(tmp_path):
    make_images(tmp_path / "img", 8, size=(32, 32))
    base = ["--base", str(TINY["ldm"]), "-t", "--seed", "2", "--name", "run", f"data.params.train.params.root="
            f"{tmp_path / 'img'}", "trainer.max_steps=6", "data.params.batch_size=2", "trainer.log_every_n_steps=1",
            "trainer.checkpoint_every_n_steps=100", "trainer.image_log_every_n_steps=0",
            "trainer.val_every_n_steps=0", *QUIET]
    script = load_train_script()
    assert script.main([*base, "--logdir", str(tmp_path / "whole")]) == 0  # never interrupted

    marker = tmp_path / "in-step-4"
    proc = _train([*base, "--logdir", str(tmp_path / "cut")], marker)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    (tmp_path / "in-step-4.sent").touch()
    rc, err = _finish(proc)
    assert rc == 130, err[-2000:]
    assert "stopped by SIGINT at step 4" in err and "Traceback" not in err
    (run,) = (tmp_path / "cut").iterdir()
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 4  # the step in flight was finished
    assert not (run / "checkpoints" / "last-ema.safetensors").exists()  # exported only at the end

    assert script.main(["--resume", str(run), "-t", "--seed", "2"]) == 0
    (whole,) = (tmp_path / "whole").iterdir()
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    for key in ("state_dict", "optimizer_states", "lr_schedulers", "grad_scalers", "rank_states"):
        assert _same(a[key], b[key], key) == []


def test_a_repeated_signal_aborts_only_after_the_repeat_window(monkeypatch):
    from ldm.training.distributed import DistContext
    from ldm.training.stopping import StopRequest

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    before = signal.getsignal(signal.SIGINT)
    with StopRequest(repeat_window_s=0.3) as stop:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the same Ctrl-C delivered twice (terminal + torchrun agent)
        time.sleep(0.05)
        assert stop.agreed(DistContext()) and stop.signal_name == "SIGINT"
        time.sleep(0.3)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            aborted = False
        except KeyboardInterrupt:
            aborted = True
    assert aborted
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    with StopRequest(repeat_window_s=0.0) as stop:  # under torchrun the agent escalates, never a repeat
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
    assert stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored

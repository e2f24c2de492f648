"""scripts/train.py with bad input: one readable line, exit status 2, nothing written, user files untouched,
no code run from a planted checkpoint."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest
import torch
from omegaconf import OmegaConf
from test_train_helpers import QUIET, TINY, load_train_script, make_images, one_thread  # noqa: F401

script = load_train_script()


class Payload:
    """Pickles as a call of os.system: loading it unsafely would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _base(tmp: Path, *overrides: str) -> list[str]:
    return ["--base", str(TINY["ldm"]), "-t", "--logdir", str(tmp / "logs"), *QUIET, *overrides]


def _root(tmp: Path) -> str:
    make_images(tmp / "img", 4, size=(32, 32))
    return f"data.params.train.params.root={tmp / 'img'}"


def _run_folder(tmp: Path, ckpt_bytes: bytes | None = None, obj: object = None) -> Path:
    """A run folder as train.py leaves it (saved config), with ``checkpoints/last.ckpt`` as given."""
    run = tmp / "logs" / "2024-01-01T00-00-00_run"
    (run / "configs").mkdir(parents=True)
    cfg = OmegaConf.load(TINY["ldm"])
    cfg.data.params.train.params.root = str(tmp / "img")
    OmegaConf.save(cfg, run / "configs" / "2024-01-01T00-00-00-project.yaml")
    make_images(tmp / "img", 4, size=(32, 32))
    if ckpt_bytes is not None or obj is not None:
        (run / "checkpoints").mkdir()
        last = run / "checkpoints" / "last.ckpt"
        if obj is not None:
            torch.save(obj, last)
        else:
            last.write_bytes(ckpt_bytes)
    return run


def _outside_run(tmp: Path) -> list[str]:
    """A checkpoint in some folder whose parent holds unrelated files named like a run's."""
    folder = tmp / "project" / "weights"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "global_step": 1}, folder / "x.ckpt")
    (tmp / "project" / "checkpoints").mkdir()
    (tmp / "project" / "checkpoints" / "last.ckpt").write_bytes(b"mine")
    (tmp / "project" / "metrics.csv").write_text("my,own\n")
    (tmp / "project" / "loss_curve.png").write_bytes(b"png")
    return ["--resume", str(folder / "x.ckpt"), "-t"]


def _export_existing(tmp: Path) -> list[str]:
    torch.save({"state_dict": {"model.diffusion_model.w": torch.ones(1)}, "global_step": 1}, tmp / "a.ckpt")
    (tmp / "out.safetensors").write_bytes(b"precious")
    return ["--export_ema", str(tmp / "a.ckpt"), str(tmp / "out.safetensors")]


def _yaml(tmp: Path, text: str) -> str:
    (tmp / "c.yaml").write_text(text)
    return str(tmp / "c.yaml")


CASES: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "no --base": (lambda t: ["-t"], "give --base"),
    "root unset (???)": (lambda t: _base(t), "data.params.train.params.root"),
    "missing data folder": (lambda t: _base(t, f"data.params.train.params.root={t / 'nope'}"), "does not exist"),
    "empty data folder": (lambda t: (t / "empty").mkdir() or _base(t, f"data.params.train.params.root={t / 'empty'}"),
                          "no images"),
    "max_steps=-5": (lambda t: _base(t, _root(t), "trainer.max_steps=-5"), "trainer.max_steps"),
    "max_steps=1.5": (lambda t: _base(t, _root(t), "trainer.max_steps=1.5"), "trainer.max_steps"),
    "unknown trainer key": (lambda t: _base(t, _root(t), "trainer.max_stpes=5"), "trainer.max_stpes"),
    "misspelled model param": (lambda t: _base(t, _root(t), "model.params.unet_config.params.model_chanels=8"),
                               "model_channels"),
    "precision fp8": (lambda t: _base(t, _root(t), "trainer.precision=fp8"), "precision"),
    "override without =": (lambda t: _base(t, _root(t), "trainer"), "key.sub=value"),
    "missing config file": (lambda t: ["--base", str(t / "nope.yaml"), "-t"], "nope.yaml"),
    "config is a folder": (lambda t: ["--base", str(t), "-t"], "folder"),
    "config is not YAML": (lambda t: ["--base", _yaml(t, "model: [unclosed\n"), "-t"], "c.yaml"),
    "config without data:": (lambda t: ["--base", _yaml(t, "model: {target: a.B}\n"), "-t"], "data:"),
    "unimportable target": (lambda t: ["--base", _yaml(t, "model: {target: no.such.Model, params: {a: 1}}\ndata: "
                                                         "{params: {}}\n"), "-t"], "no.such"),
    "required param missing": (lambda t: ["--base", _yaml(t, "model: {target: ldm.models.autoencoder.AutoencoderKL, "
                                                             "params: {embed_dim: 4}}\ndata: {params: {}}\n"), "-t"],
                               "needs 'ddconfig', 'lossconfig'"),
    "data batch_size missing": (lambda t: _base(t, _root(t), "data.params.batch_size=null"), "batch_size"),
    "resume: missing folder": (lambda t: ["--resume", str(t / "nope"), "-t"], "no such run folder"),
    "resume: folder that is no run": (lambda t: (t / "x").mkdir() or ["--resume", str(t / "x"), "-t"],
                                      "not a run folder"),
    "resume: run without checkpoint": (lambda t: ["--resume", str(_run_folder(t)), "-t"], "saved no checkpoint"),
    "resume: corrupt last.ckpt": (lambda t: ["--resume", str(_run_folder(t, b"PK\x03\x04 garbage")), "-t"],
                                  "cannot read checkpoint"),
    "resume: empty last.ckpt": (lambda t: ["--resume", str(_run_folder(t, b"")), "-t"], "cannot read checkpoint"),
    "resume: malicious last.ckpt": (lambda t: ["--resume", str(_run_folder(t, obj={"state_dict": {}, "x": Payload(
        t / "PWNED")})), "-t"], "refusing"),
    "resume: not a training checkpoint": (lambda t: ["--resume", str(_run_folder(t, obj={"state_dict": {
        "w": torch.zeros(1)}})), "-t"], "cannot be resumed"),
    "resume: checkpoint outside a run folder": (_outside_run, "outside a run folder"),
    "export: output exists": (_export_existing, "--force"),
    "export: missing checkpoint": (lambda t: ["--export_ema", str(t / "no.ckpt"), str(t / "o.safetensors")],
                                   "not found"),
    "export: corrupt checkpoint": (lambda t: (t / "c.ckpt").write_bytes(b"junk") and [
        "--export_ema", str(t / "c.ckpt"), str(t / "o.safetensors")], "cannot read"),
    "export: output is a folder": (lambda t: (t / "d").mkdir() or _export_existing(t)[:2] + [str(t / "d")],
                                   "is a folder"),
}


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()[:64])
            for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, case):
    make_args, expected = CASES[case]
    args = make_args(tmp_path)
    before = _snapshot(tmp_path)
    dirs = sorted(p for p in tmp_path.rglob("*") if p.is_dir())
    assert script.main(args) == 2
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and expected in lines[0], err
    assert "Traceback" not in err and out == ""
    assert _snapshot(tmp_path) == before  # nothing written, user files untouched
    assert sorted(p for p in tmp_path.rglob("*") if p.is_dir()) == dirs
    assert not (tmp_path / "PWNED").exists()


def test_export_replaces_only_with_force(tmp_path, capsys):
    args = _export_existing(tmp_path)
    assert script.main([*args, "--force"]) == 0
    out = tmp_path / "out.safetensors"
    assert out.read_bytes() != b"precious" and out.stat().st_mode & 0o777 == 0o644


def test_torchrun_example_arguments_parse_as_documented():
    """configs/training/README.md: overrides after --base are overrides, not more config files."""
    args = script.parse_args(["-t", "--name", "sd2-ft", "--base", "configs/stable-diffusion/v2-inference.yaml",
                              "configs/training/sd2-finetune.yaml", "model.params.ckpt_path=/models/512-base-ema.ckpt",
                              "data.params.train.params.urls=/data/{00000..00999}.tar"])
    assert args.base == ["configs/stable-diffusion/v2-inference.yaml", "configs/training/sd2-finetune.yaml"]
    assert args.overrides == ["model.params.ckpt_path=/models/512-base-ema.ckpt",
                              "data.params.train.params.urls=/data/{00000..00999}.tar"]
    args = script.parse_args(["--resume", "a=b/run", "trainer.max_steps=3", "--base", "x.yaml", "-n", "k=v"])
    assert (args.resume, args.name, args.base, args.overrides) == ("a=b/run", "k=v", ["x.yaml"],
                                                                   ["trainer.max_steps=3"])

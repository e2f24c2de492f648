"""Bad-input catalogue (issue 13): every case is a command a careless user or an attacker could type.

The contract, asserted for each: the right exit status; stderr holds exactly one ``<script>.py: error: ...`` line
with the expected words and no traceback; nothing is written (the output folder does not appear, the workspace's
files keep their bytes and times); no code from a planted payload runs (its marker file never appears). Commands
run in-process (``main(argv)``) with the tiny model of ``tiny_model.py``.
"""
from __future__ import annotations

import errno
import hashlib
import os
import pickle
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from tiny_model import ROOT, load_script, model_args, tiny_config, write_tiny_model

SCRIPTS = {name: load_script(name) for name in ("txt2img", "img2img", "train")}
MARKER = "payload-ran"


class _Payload:
    """Pickles to a call of os.system that would create the marker file next to it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width x height`` (1-bit grey) with almost no pixel data: cheap to make, and
    anything that decodes it fails; a reader that checks the size first refuses it without decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def _changed(sd: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    """A copy of a state_dict damaged in one way (NaN, inf, int8, bool, a missing key, a wrong shape)."""
    sd = dict(sd)
    key = next(k for k in sd if k.startswith("model.diffusion_model.") and sd[k].dim() == 4)
    if how == "nan":
        sd[key] = sd[key].clone().fill_(float("nan"))
    elif how == "inf":
        sd[key] = sd[key].clone().fill_(float("inf"))
    elif how == "int8":
        sd[key] = sd[key].to(torch.int8)
    elif how == "bool":
        sd[key] = sd[key] > 0
    elif how == "missing":
        del sd[key]
    elif how == "shape":
        sd[key] = torch.zeros(3, 3)
    return sd


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> dict[str, Path]:
    """The workspace: the tiny model and every bad input file, written once; tests must leave it unchanged."""
    root = tmp_path_factory.mktemp("bad-inputs")
    config, ckpt = write_tiny_model(root / "model")
    sd = load_file(str(ckpt))
    f: dict[str, Path] = {"root": root, "config": config, "ckpt": ckpt}

    def put(key: str, name: str, data: bytes) -> None:
        f[key] = root / name
        f[key].write_bytes(data)
    for how in ("nan", "inf", "int8", "bool", "missing", "shape"):
        f[f"ckpt_{how}"] = root / f"ckpt-{how}.safetensors"
        save_file(_changed(sd, how), str(f[f"ckpt_{how}"]))
    put("empty_ckpt", "empty.ckpt", b"")
    put("empty_st", "empty.safetensors", b"")
    put("garbage_ckpt", "garbage.ckpt", b"this is not a checkpoint\n" * 20)
    put("truncated_st", "truncated.safetensors", ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    f["folder"] = root / "a-folder"
    f["folder"].mkdir()
    f["payload_ckpt"] = root / "payload.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Payload(root / MARKER)}, f["payload_ckpt"])
    f["payload_pickle"] = root / "payload-plain.ckpt"
    f["payload_pickle"].write_bytes(pickle.dumps(_Payload(root / MARKER)))
    put("bad_yaml", "bad.yaml", b"model: [1, 2\n")
    put("no_model_yaml", "no-model.yaml", b"foo: 1\n")
    payload = tiny_config(root / "model" / "tiny-text")
    payload["model"]["params"]["first_stage_config"]["params"]["lossconfig"] = {
        "target": "os.system", "params": {"command": f"touch '{root / MARKER}'"}}
    OmegaConf.save(OmegaConf.create(payload), f.setdefault("payload_yaml", root / "payload.yaml"))
    put("empty_prompts", "empty.txt", b"")
    put("blank_prompts", "blank.txt", b"\n   \n\t\n")
    put("latin1_prompts", "latin1.txt", "caf\xe9 au lait\n".encode("latin-1"))
    put("a_file", "a-file.txt", b"user data\n")
    put("existing_st", "mine.safetensors", b"the user's own file\n")
    put("empty_png", "empty.png", b"")
    put("text_png", "text.png", b"not an image")
    good = root / "good.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(good)
    f["good_png"] = good
    put("truncated_png", "truncated.png", good.read_bytes()[:60])
    Image.new("RGB", (1, 1)).save(f.setdefault("one_pixel", root / "one-pixel.png"))
    f["bomb_png"] = _png_header_only(root / "bomb.png", 20000, 20000)
    f["huge_png"] = _png_header_only(root / "huge.png", 12000, 12000)
    f["safety_empty"] = root / "safety"
    f["safety_empty"].mkdir()
    (root / "run" / "checkpoints").mkdir(parents=True)
    put("run_ckpt", "run/checkpoints/last.ckpt", b"junk\n")
    f["run"] = root / "run"
    f["fifo"] = root / "a-pipe"
    os.mkfifo(f["fifo"])  # reading it would block forever: it must be refused unread
    return f


@dataclass(frozen=True)
class Case:
    """A command line (built from the workspace), its expected exit status and words of its one error line."""

    id: str
    script: str
    args: Callable[[dict[str, Path]], list[str]]
    status: int
    words: str
    use_model: bool = True  # prepend --config/--ckpt of the tiny model, --no_safety_check, 2 steps


def _t(id: str, args: Callable[[dict[str, Path]], list[str]], words: str, status: int = 2, script: str = "txt2img",
       use_model: bool = True) -> Case:
    return Case(id, script, args, status, words, use_model)


def _i(id: str, args: Callable[[dict[str, Path]], list[str]], words: str, status: int = 2) -> Case:
    return Case(id, "img2img", lambda w: ["--init-img", str(w["good_png"]), *args(w)], status, words)


def _ckpt(key: str) -> Callable[[dict[str, Path]], list[str]]:
    return lambda w: ["--ckpt", str(w[key]), "--config", str(w["config"])]


TXT2IMG = [
    _t("steps-zero", lambda w: ["--ddim_steps", "0"], "--ddim_steps/--steps must be at least 1"),
    _t("steps-negative", lambda w: ["--steps", "-3"], "must be at least 1"),
    _t("steps-too-many", lambda w: ["--ddim_steps", "100000"], "exceeds the model's 1000"),
    _t("steps-not-a-number", lambda w: ["--ddim_steps", "ten"], "invalid int value"),
    _t("n-samples-zero", lambda w: ["--n_samples", "0"], "--n_samples must be at least 1"),
    _t("n-iter-zero", lambda w: ["--n_iter", "0"], "--n_iter must be at least 1"),
    _t("n-rows-negative", lambda w: ["--n_rows", "-1"], "--n_rows must be at least 0"),
    _t("height-zero", lambda w: ["--H", "0"], "--H must be at least 1"),
    _t("width-negative", lambda w: ["--W", "-8"], "--W must be at least 1"),
    _t("height-odd", lambda w: ["--H", "7"], "not a multiple of 2"),
    _t("width-odd", lambda w: ["--W", "33"], "use 32 or 34"),
    _t("height-100000", lambda w: ["--H", "100000"], "each side may be at most 16384"),
    _t("area-too-large", lambda w: ["--H", "8192", "--W", "8192"], "megapixels"),
    _t("too-many-images", lambda w: ["--n_samples", "10001", "--n_iter", "1"], "more than 10000"),
    _t("too-many-iterations", lambda w: ["--n_samples", "3", "--n_iter", "5000"], "15000 images"),
    _t("batch-beyond-memory", lambda w: ["--n_samples", "5000", "--n_iter", "1", "--H", "4096", "--W", "4096"],
       "GiB free"),
    _t("scale-1e30", lambda w: ["--scale", "1e30"], "--scale must be between -50 and 50"),
    _t("scale-minus-100", lambda w: ["--scale", "-100"], "--scale must be between"),
    _t("scale-nan", lambda w: ["--scale", "nan"], "--scale must be a finite number"),
    _t("scale-inf", lambda w: ["--scale", "inf"], "finite number"),
    _t("eta-1e6", lambda w: ["--ddim_eta", "1e6"], "--ddim_eta must be at most 1"),
    _t("eta-1.5", lambda w: ["--ddim_eta", "1.5"], "at most 1"),
    _t("eta-negative", lambda w: ["--ddim_eta", "-0.5"], "--ddim_eta must be >= 0"),
    _t("eta-nan", lambda w: ["--ddim_eta", "nan"], "finite number"),
    _t("seed-negative", lambda w: ["--seed", "-1"], "--seed must be between 0 and 2**63 - 1"),
    _t("seed-2-64", lambda w: ["--seed", str(2 ** 64)], "--seed must be between"),
    _t("threads-zero", lambda w: ["--threads", "0"], "--threads must be at least 1"),
    _t("threads-100000", lambda w: ["--threads", "100000"], "more than 4 per CPU core"),
    _t("device-meta", lambda w: ["--device", "meta"], "--device meta cannot run a model"),
    _t("device-nonsense", lambda w: ["--device", "toaster"], "invalid --device 'toaster'"),
    _t("channels-mismatch", lambda w: ["--C", "3"], "--C 3 does not match the model's 4 latent channels"),
    _t("factor-mismatch", lambda w: ["--f", "8"], "--f 8 does not match the model"),
    _t("tiled-vae-zero", lambda w: ["--tiled_vae", "0"], "--tiled_vae must be at least 1"),
    _t("repeat-zero", lambda w: ["--repeat", "0"], "--repeat must be at least 1"),
    _t("repeat-without-file", lambda w: ["--repeat", "2"], "--repeat applies to --from-file prompts"),
    _t("prompt-empty", lambda w: ["--prompt", ""], "--prompt is empty"),
    _t("prompt-blank", lambda w: ["--prompt", "   "], "--prompt is empty"),
    _t("prompt-and-file", lambda w: ["--prompt", "x", "--from-file", str(w["a_file"])], "not both"),
    _t("prompt-file-missing", lambda w: ["--from-file", str(w["root"] / "nope.txt")], "does not exist"),
    _t("prompt-file-dev-null", lambda w: ["--from-file", "/dev/null"], "not a regular file"),
    _t("prompt-file-folder", lambda w: ["--from-file", str(w["folder"])], "is a folder, not a prompt file;"),
    _t("prompt-file-fifo", lambda w: ["--from-file", str(w["fifo"])], "not a regular file"),
    _t("prompt-file-empty", lambda w: ["--from-file", str(w["empty_prompts"])], "contains no prompts"),
    _t("prompt-file-blank", lambda w: ["--from-file", str(w["blank_prompts"])], "contains no prompts"),
    _t("prompt-file-latin1", lambda w: ["--from-file", str(w["latin1_prompts"])], "is not UTF-8 text"),
    _t("sampler-unknown", lambda w: ["--sampler", "euler_z"], "unknown sampler 'euler_z'"),
    _t("sampler-conflict", lambda w: ["--plms", "--dpm"], "conflicting sampler flags"),
    _t("eta-with-plms", lambda w: ["--plms", "--ddim_eta", "0.5"], "only applies to"),
    _t("unknown-flag", lambda w: ["--frobnicate"], "unrecognized arguments: --frobnicate"),
    _t("precision-half", lambda w: ["--precision", "half"], "invalid choice: 'half'"),
    _t("compile-nonsense", lambda w: ["--compile", "turbo"], "invalid choice: 'turbo'"),
    _t("config-without-ckpt", lambda w: ["--config", str(w["config"])], "--config", use_model=False),
    _t("ckpt-missing", lambda w: ["--ckpt", str(w["root"] / "nope.safetensors"), "--no_safety_check"],
       "does not exist", use_model=False),
    _t("ckpt-folder", _ckpt("folder"), "is a folder, not a checkpoint file"),
    _t("ckpt-dev-null", lambda w: ["--ckpt", "/dev/null", "--config", str(w["config"])], "not a regular file"),
    _t("ckpt-empty-ckpt", _ckpt("empty_ckpt"), "is empty (0 bytes)"),
    _t("ckpt-empty-safetensors", _ckpt("empty_st"), "is empty (0 bytes)"),
    _t("ckpt-garbage", _ckpt("garbage_ckpt"), "cannot read checkpoint"),
    _t("ckpt-truncated", _ckpt("truncated_st"), "cannot read safetensors file"),
    _t("ckpt-pickle-payload", _ckpt("payload_ckpt"), "could execute code"),
    _t("ckpt-plain-pickle-payload", _ckpt("payload_pickle"), "payload-plain.ckpt"),
    _t("ckpt-nan", _ckpt("ckpt_nan"), "NaN/inf values"),
    _t("ckpt-inf", _ckpt("ckpt_inf"), "NaN/inf values"),
    _t("ckpt-int8", _ckpt("ckpt_int8"), "(int8)"),
    _t("ckpt-bool", _ckpt("ckpt_bool"), "(bool)"),
    _t("ckpt-missing-key", _ckpt("ckpt_missing"), "1 missing keys"),
    _t("ckpt-wrong-shape", _ckpt("ckpt_shape"), "wrong shape"),
    _t("config-missing", lambda w: ["--ckpt", str(w["ckpt"]), "--config", str(w["root"] / "nope.yaml")],
       "does not exist"),
    _t("config-invalid-yaml", lambda w: ["--ckpt", str(w["ckpt"]), "--config", str(w["bad_yaml"])],
       "bad.yaml"),
    _t("config-no-model", lambda w: ["--ckpt", str(w["ckpt"]), "--config", str(w["no_model_yaml"])],
       "has no 'model:' section"),
    _t("config-payload", lambda w: ["--ckpt", str(w["ckpt"]), "--config", str(w["payload_yaml"])], "os.system"),
    _t("vae-missing", lambda w: ["--vae", str(w["root"] / "nope.safetensors")], "does not exist"),
    _t("vae-is-full-model", lambda w: ["--vae", str(w["ckpt"])], "is a full model checkpoint"),
    _t("vae-garbage", lambda w: ["--vae", str(w["garbage_ckpt"])], "cannot read checkpoint"),
    _t("outdir-is-a-file", lambda w: ["--outdir", str(w["a_file"])], "is not a folder"),
    _t("outdir-dev-null", lambda w: ["--outdir", "/dev/null"], "is not a folder"),
    _t("outdir-under-a-file", lambda w: ["--outdir", str(w["a_file"] / "sub")], "is a file, not a folder"),
    _t("safety-folder-missing", lambda w: ["--safety_checker", str(w["root"] / "nope"), *model_args(
        (w["config"], w["ckpt"]))[:4]], "does not exist", use_model=False),
    _t("safety-folder-empty", lambda w: ["--safety_checker", str(w["safety_empty"]), *model_args(
        (w["config"], w["ckpt"]))[:4]], "lacks model.safetensors", use_model=False),
    _t("safety-contradiction", lambda w: ["--safety_checker", str(w["safety_empty"])], "contradict each other"),
]

IMG2IMG = [
    _t("no-init-img", lambda w: [], "img2img needs an input image", script="img2img"),
    _t("init-img-missing", lambda w: ["--init-img", str(w["root"] / "nope.png")], "does not exist",
       script="img2img"),
    _t("init-img-folder", lambda w: ["--init-img", str(w["folder"])], "is a folder, not an image file",
       script="img2img"),
    _t("init-img-dev-null", lambda w: ["--init-img", "/dev/null"], "not a regular file", script="img2img"),
    _t("init-img-fifo", lambda w: ["--init-img", str(w["fifo"])], "not a regular file", script="img2img"),
    _t("init-img-empty", lambda w: ["--init-img", str(w["empty_png"])], "cannot read", script="img2img"),
    _t("init-img-text", lambda w: ["--init-img", str(w["text_png"])], "cannot read", script="img2img"),
    _t("init-img-truncated", lambda w: ["--init-img", str(w["truncated_png"])], "cannot read", script="img2img"),
    _t("init-img-one-pixel", lambda w: ["--init-img", str(w["one_pixel"])], "needs at least 2 pixels",
       script="img2img"),
    _t("init-img-bomb-20000", lambda w: ["--init-img", str(w["bomb_png"])], "too large to read",
       script="img2img"),
    _t("init-img-12000", lambda w: ["--init-img", str(w["huge_png"])], "megapixels", script="img2img"),
    _i("strength-above-one", lambda w: ["--strength", "1.5"], "--strength must be between 0 and 1"),
    _i("strength-negative", lambda w: ["--strength", "-0.1"], "--strength must be between 0 and 1"),
    _i("strength-nan", lambda w: ["--strength", "nan"], "--strength must be a finite number"),
    _i("img2img-sampler-unknown", lambda w: ["--sampler", "nope"], "unknown sampler 'nope'"),
    _i("img2img-width-odd", lambda w: ["--W", "31"], "not a multiple of 2"),
    _i("img2img-scale-huge", lambda w: ["--scale", "1e9"], "--scale must be between"),
    _i("img2img-ckpt-nan", _ckpt("ckpt_nan"), "NaN/inf values"),
    _i("img2img-outdir-file", lambda w: ["--outdir", str(w["a_file"])], "is not a folder"),
]


def _tiny_ldm(w: dict[str, Path]) -> list[str]:
    return ["--base", str(ROOT / "configs" / "training" / "tiny-ldm.yaml"), "-t", "--logdir", str(w["root"] / "logs")]


def _tr(id: str, args: Callable[[dict[str, Path]], list[str]], words: str) -> Case:
    return Case(id, "train", args, 2, words, use_model=False)


TRAIN = [
    _tr("train-nothing-to-do", lambda w: [], "nothing to do"),
    _tr("train-base-missing", lambda w: ["--base", str(w["root"] / "nope.yaml"), "-t"], "not found"),
    _tr("train-resume-missing", lambda w: ["--resume", str(w["root"] / "no-run"), "-t"], "--resume"),
    _tr("train-base-invalid-yaml", lambda w: ["--base", str(w["bad_yaml"]), "-t"], "bad.yaml"),
    _tr("train-base-no-model", lambda w: ["--base", str(w["no_model_yaml"]), "-t"], "model"),
    _tr("train-root-unset", lambda w: ["--base", str(ROOT / "configs" / "training" / "tiny-ldm.yaml"), "-t",
                                       "--logdir", str(w["root"] / "logs")], "root"),
    _tr("train-data-empty", lambda w: [*_tiny_ldm(w), f"data.params.train.params.root={w['folder']}"],
        "no images"),
    _tr("train-data-missing", lambda w: [*_tiny_ldm(w), f"data.params.train.params.root={w['root'] / 'nope'}"],
        "does not exist"),
    _tr("train-bad-override", lambda w: [*_tiny_ldm(w), "not-an-override"], "key.sub=value"),
    _tr("train-resume-not-a-run", lambda w: ["--resume", str(w["run"]), "-t"], "not a run folder"),
    _tr("train-resume-file-outside-run", lambda w: ["--resume", str(w["run_ckpt"]), "-t"], "outside a run folder"),
    _tr("export-missing", lambda w: ["--export_ema", str(w["root"] / "nope.ckpt"), str(w["root"] / "o.safetensors")],
        "not found"),
    _tr("export-empty", lambda w: ["--export_ema", str(w["empty_ckpt"]), str(w["root"] / "o.safetensors")],
        "cannot read"),
    _tr("export-garbage", lambda w: ["--export_ema", str(w["garbage_ckpt"]), str(w["root"] / "o.safetensors")],
        "garbage.ckpt"),
    _tr("export-payload", lambda w: ["--export_ema", str(w["payload_ckpt"]), str(w["root"] / "o.safetensors")],
        "payload.ckpt"),
    _tr("export-overwrite", lambda w: ["--export_ema", str(w["garbage_ckpt"]), str(w["existing_st"])],
        "already exists"),
]

CASES = TXT2IMG + IMG2IMG + TRAIN


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file and folder under ``folder``: (size, mtime_ns, sha1) of files, (-1, 0, '') of folders."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p)] = (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
        else:
            out[str(p)] = (-1, 0, "")
    return out


def _call(script: str, argv: list[str]) -> int:
    try:
        return SCRIPTS[script].main(argv)
    except SystemExit as e:  # argparse in train.py
        return e.code if isinstance(e.code, int) else 1


def _error_lines(err: str, script: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith(f"{script}.py: ")]


def assert_contract(err: str, script: str, words: str) -> str:
    """stderr holds no traceback and exactly one ``<script>.py: ...`` line, containing ``words``; returns it."""
    assert "Traceback" not in err, err
    lines = _error_lines(err, script)
    assert len(lines) == 1, err
    assert words in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_cleanly(case: Case, ws, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative defaults (outputs/, logs/) would land here
    out = tmp_path / "out"
    argv = case.args(ws)
    if case.use_model:
        argv = [*model_args((ws["config"], ws["ckpt"])), *argv]
    if case.script != "train" and "--outdir" not in argv:
        argv += ["--outdir", str(out)]
    before = _snapshot(ws["root"])
    status = _call(case.script, argv)
    err = capsys.readouterr().err
    assert status == case.status, err
    assert_contract(err, case.script, case.words)
    assert not out.exists() and not list(tmp_path.iterdir())  # nothing written, not even a folder
    assert _snapshot(ws["root"]) == before  # user files untouched
    assert not (ws["root"] / MARKER).exists()  # no payload ran


def test_catalogue_size():
    assert len(CASES) >= 80 and len({c.id for c in CASES}) == len(CASES)


# Failures during a run: one line, the right status, no partial file, the saved count said.

def _run_tiny(ws, out: Path, *extra: str) -> int:
    argv = [*model_args((ws["config"], ws["ckpt"]), steps=1), "--outdir", str(out), "--prompt", "p", "--n_samples", "1"]
    return SCRIPTS["txt2img"].main([*argv, *extra])


def _complete_pngs(out: Path) -> list[Path]:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    for p in files:
        assert p.suffix == ".png" and not p.name.startswith("."), p
        with Image.open(p) as image:
            image.load()
    return files


def _fail_on_call(monkeypatch, target: object, name: str, error: BaseException, after: int = 0) -> None:
    """Make ``target.name`` raise ``error`` from its ``after``-th call on (earlier calls work)."""
    original, calls = getattr(target, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise error
        return original(*args, **kwargs)
    monkeypatch.setattr(target, name, wrapper)


@pytest.mark.parametrize("error,status,words", [
    (OSError(errno.ENOSPC, "No space left on device"), 1, "no space left"),
    (PermissionError(errno.EACCES, "Permission denied"), 2, "Permission denied"),
    (OSError(errno.EROFS, "Read-only file system"), 2, "Read-only file system"),
], ids=["disk-full", "permission-denied", "read-only"])
def test_write_failure_is_one_line_and_leaves_no_partial_file(ws, tmp_path, capsys, monkeypatch, error, status,
                                                               words):
    _fail_on_call(monkeypatch, Image.Image, "save", error)
    assert _run_tiny(ws, tmp_path / "out", "--n_iter", "1") == status
    line = assert_contract(capsys.readouterr().err, "txt2img", words)
    assert "no images saved" in line
    assert _complete_pngs(tmp_path / "out") == []


def test_ctrl_c_says_how_many_images_were_saved(ws, tmp_path, capsys, monkeypatch):
    from ldm.inference import pipeline

    _fail_on_call(monkeypatch, pipeline, "decode", KeyboardInterrupt(), after=1)  # during the second batch
    assert _run_tiny(ws, tmp_path / "out", "--n_iter", "3") == 130
    line = assert_contract(capsys.readouterr().err, "txt2img", "interrupted")
    assert line.startswith("txt2img.py: stopped:") and "1 image saved" in line
    assert [p.name for p in _complete_pngs(tmp_path / "out")] == ["00000.png"]


def test_ctrl_c_while_writing_leaves_no_partial_file(ws, tmp_path, capsys, monkeypatch):
    _fail_on_call(monkeypatch, Image.Image, "save", KeyboardInterrupt())
    assert _run_tiny(ws, tmp_path / "out") == 130
    assert "no images saved" in assert_contract(capsys.readouterr().err, "txt2img", "interrupted")
    assert _complete_pngs(tmp_path / "out") == []


@pytest.mark.parametrize("error,words", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), "out of memory"),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
     "out of memory"),
    (MemoryError(), "out of memory"),
    (RuntimeError("something nobody expected"), "unexpected RuntimeError: something nobody expected"),
], ids=["cuda-oom", "cpu-oom", "memory-error", "bug"])
def test_failure_while_sampling_is_one_line(ws, tmp_path, capsys, monkeypatch, error, words):
    from ldm.inference import pipeline

    _fail_on_call(monkeypatch, pipeline, "decode", error)
    assert _run_tiny(ws, tmp_path / "out") == 1
    assert_contract(capsys.readouterr().err, "txt2img", words)
    assert _complete_pngs(tmp_path / "out") == []


def test_nan_result_is_an_error_not_a_black_picture(ws, tmp_path, capsys, monkeypatch):
    from ldm.models.diffusion.ddpm import LatentDiffusion

    monkeypatch.setattr(LatentDiffusion, "decode_first_stage",
                        lambda self, z, *a, **k: torch.full((z.shape[0], 3, 32, 32), float("nan")))
    assert _run_tiny(ws, tmp_path / "out") == 1
    line = assert_contract(capsys.readouterr().err, "txt2img", "NaN/inf")
    assert "no images saved" in line
    assert _complete_pngs(tmp_path / "out") == []


def test_main_never_leaks_a_traceback_for_keyboard_interrupt_at_load(ws, tmp_path, capsys, monkeypatch):
    from ldm.inference import loading

    _fail_on_call(monkeypatch, loading, "load_model", KeyboardInterrupt())
    assert _run_tiny(ws, tmp_path / "out") == 130
    assert "no images saved" in assert_contract(capsys.readouterr().err, "txt2img", "interrupted")
    assert not (tmp_path / "out").exists()


def test_oversized_init_image_is_refused_before_decoding(ws, tmp_path, monkeypatch, capsys):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the image was decoded")
    monkeypatch.setattr(Image.Image, "load", no_decoding)
    argv = [*model_args((ws["config"], ws["ckpt"])), "--outdir", str(tmp_path / "out")]
    for key in ("bomb_png", "huge_png"):
        assert SCRIPTS["img2img"].main([*argv, "--init-img", str(ws[key])]) == 2
        assert_contract(capsys.readouterr().err, "img2img", str(ws[key].name))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

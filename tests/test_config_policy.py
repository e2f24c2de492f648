"""Model configs may not run code (issue 13, part 1): every ``target`` of a config used for inference (given with
--config or found beside the checkpoint) must be one of the project's classes or on a short reviewed list; anything
else is refused before it is imported, unless the user passes --unsafe_config."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm import config_policy
from ldm.config_policy import UnsafeConfigError, check_config, config_targets, find_targets, refusal
from ldm.inference import loading
from ldm.inference.errors import UsageError
from tiny_model import ROOT, load_script, samples, tiny_config, write_tiny_model

txt2img = load_script("txt2img")

SHIPPED = sorted((ROOT / "configs").rglob("*.yaml")) + [ROOT / "models" / "ldm" / "sd-shapes" / "config.yaml"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny model written as ``tiny.yaml`` beside ``tiny.safetensors``: the yaml is the checkpoint's sidecar."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def _text_dir(tiny: tuple[Path, Path]) -> Path:
    return tiny[0].parent / "tiny-text"


def _config_with_loss(tiny: tuple[Path, Path], loss: dict) -> dict:
    """The tiny model's config with ``loss`` as the autoencoder's ``lossconfig``, which the model really builds."""
    config = tiny_config(_text_dir(tiny))
    config["model"]["params"]["first_stage_config"]["params"]["lossconfig"] = loss
    return config


def _popen_payload(marker: Path) -> dict:
    return {"target": "subprocess.Popen",
            "params": {"args": [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('ran')"]}}


def _system_payload(marker: Path) -> dict:
    return {"target": "os.system", "params": {"command": f"touch '{marker}'"}}


def _planted_checkpoint(tiny: tuple[Path, Path], folder: Path, config: dict) -> Path:
    """A copy of the tiny checkpoint as ``folder/model.safetensors`` with ``config`` planted as its sidecar."""
    folder.mkdir(parents=True, exist_ok=True)
    ckpt = folder / "model.safetensors"
    ckpt.write_bytes(tiny[1].read_bytes())
    OmegaConf.save(OmegaConf.create(config), folder / "model.yaml")
    return ckpt


def _run(*args: str) -> int:
    return txt2img.main(["--no_safety_check", "--ddim_steps", "1", "--n_samples", "1", "--n_iter", "1",
                         "--prompt", "p", *args])


# The policy itself.

@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_configs_pass_the_policy(path: Path):
    config = OmegaConf.load(path)
    check_config(config, str(path))  # overlays (a few overrides for another config) name no targets at all
    assert all(refusal(t) is None for t in config_targets(config))


def test_the_original_sd_class_paths_are_allowed():
    for target in ("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.models.autoencoder.AutoencoderKL",
                   "ldm.modules.diffusionmodules.openaimodel.UNetModel", "ldm.lr_scheduler.LambdaLinearScheduler",
                   "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                   "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder", "torch.nn.Identity"):
        assert refusal(target) is None, target


@pytest.mark.parametrize("target, reason", [
    ("subprocess.Popen", "is not one of this project's classes"),
    ("os.system", "is not one of this project's classes"),
    ("posix.system", "is not one of this project's classes"),
    ("builtins.eval", "is not one of this project's classes"),
    ("torch.load", "is not one of this project's classes"),
    ("torch.nn.Module", "is not one of this project's classes"),
    ("ldm.util.instantiate_from_config", "is not one of this project's classes"),  # not config material
    ("ldm.inference.outputs.OutputWriter", "is not one of this project's classes"),
    ("ldm.models.diffusion.ddpm.torch", "is not a class defined in this project"),  # a module, not a class
    ("ldm.modules.attention.importlib", "is not a class defined in this project"),
    ("ldm.models.autoencoder.instantiate_from_config", "is not a class defined in this project"),
    ("ldm.models.diffusion.ddpm.NoSuchModel", "does not exist in this project"),
    ("ldm.modules.midas.api.MiDaSInference", "does not exist in this project"),
    ("Popen", "is not a dotted class path"),
    ("os.system; rm", "is not a dotted class path"),
    (".ldm.models.X", "is not a dotted class path"),
    (42, "is not a dotted class path"),
    (None, "is not a dotted class path"),
])
def test_targets_outside_the_project_are_refused(target, reason: str):
    assert refusal(target).startswith(reason)


def test_a_refused_target_is_never_imported(tmp_path: Path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "payload_module_xyz.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n"
                                                    f"class Payload:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = {"model": {"target": "payload_module_xyz.Payload"}}
    with pytest.raises(UnsafeConfigError, match="'payload_module_xyz.Payload' \\(at model.target\\)"):
        check_config(config, "planted.yaml")
    assert not marker.exists() and "payload_module_xyz" not in sys.modules


def test_nested_targets_anywhere_in_the_tree_are_checked():
    deep = {"target": "os.system", "params": {"command": "true"}}
    config = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
            "extra": [{"a": 1}, {"deeper": {"x": deep}}]}}}}}
    where = "model.params.unet_config.params.extra[1].deeper.x.target"
    assert (where, "os.system") in find_targets(config)
    with pytest.raises(UnsafeConfigError) as e:
        check_config(OmegaConf.create(config), "c.yaml")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"config 'c.yaml' names target 'os.system' (at {where}), which is not one of this "
                              f"project's classes")
    assert message.endswith("pass --unsafe_config")
    # Sections that inference never builds are checked too: a config that names code is not used at all.
    with pytest.raises(UnsafeConfigError, match="at data.params.train.target"):
        check_config({"model": {"target": "torch.nn.Identity"},
                      "data": {"params": {"train": {"target": "subprocess.run"}}}}, "c.yaml")


def test_interpolations_are_resolved_before_checking(monkeypatch):
    monkeypatch.setenv("LDM_TEST_TARGET", "subprocess.Popen")
    env = OmegaConf.create({"model": {"target": "${oc.env:LDM_TEST_TARGET}"}})
    with pytest.raises(UnsafeConfigError, match="names target 'subprocess.Popen' \\(at model.target\\)"):
        check_config(env, "env.yaml")
    decoded = OmegaConf.create({"model": {"target": "torch.nn.Identity",
                                          "params": {"loss": "${oc.decode:'{target: os.system}'}"}}})
    with pytest.raises(UnsafeConfigError, match="names target 'os.system' \\(at model.params.loss.target\\)"):
        check_config(decoded, "decode.yaml")
    broken = OmegaConf.create({"model": {"target": "${nowhere.to_be.found}"}})
    with pytest.raises(UnsafeConfigError, match="cannot be resolved"):
        check_config(broken, "broken.yaml")


def test_read_config_applies_the_policy_unless_allowed(tiny, tmp_path: Path, caplog):
    marker = tmp_path / "marker"
    path = tmp_path / "bad.yaml"
    OmegaConf.save(OmegaConf.create(_config_with_loss(tiny, _popen_payload(marker))), path)
    with pytest.raises(UsageError, match=f"config '{path}' names target 'subprocess.Popen'"):
        loading.read_config(path)
    with caplog.at_level("WARNING", logger="ldm.inference.loading"):
        config = loading.read_config(path, allow_unsafe=True)
    assert config.model.target == "ldm.models.diffusion.ddpm.LatentDiffusion"
    assert any("--unsafe_config" in r.getMessage() and "subprocess.Popen" in r.getMessage() for r in caplog.records)
    assert not marker.exists()
    assert loading.read_config(tiny[0]).model.params.channels == 4  # an ordinary config reads as before


# The scripts.

@pytest.mark.parametrize("payload", ["popen", "system"])
@pytest.mark.parametrize("how", ["sidecar", "config"])
def test_a_config_payload_is_refused_and_never_runs(tiny, tmp_path: Path, capsys, how: str, payload: str):
    marker = tmp_path / "marker"
    loss = _popen_payload(marker) if payload == "popen" else _system_payload(marker)
    ckpt = _planted_checkpoint(tiny, tmp_path / "download", _config_with_loss(tiny, loss))
    out = tmp_path / "out"
    args = ["--ckpt", str(ckpt), "--outdir", str(out)]
    if how == "config":
        args += ["--config", str(ckpt.with_suffix(".yaml"))]
    capsys.readouterr()
    assert _run(*args) == 2
    err = capsys.readouterr().err.strip()
    target = "subprocess.Popen" if payload == "popen" else "os.system"
    assert err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(f"txt2img.py: error: config '{ckpt.with_suffix('.yaml')}' names target '{target}' "
                          f"(at model.params.first_stage_config.params.lossconfig.target)")
    assert "--unsafe_config" in err
    assert not marker.exists() and not out.exists()


def _marker_module(folder: Path) -> None:
    (folder / "ldm_test_marker_loss.py").write_text(
        "import torch\n"
        "class MarkerLoss(torch.nn.Module):\n"
        "    def __init__(self, path):\n"
        "        super().__init__()\n"
        "        open(path, 'w').write('ran')\n")


def test_a_trusted_config_runs_its_own_code_with_the_opt_in(tiny, tmp_path: Path, monkeypatch, capsys):
    """A harmless non-project target (a loss module that writes a marker) is built only with --unsafe_config."""
    _marker_module(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "marker"
    loss = {"target": "ldm_test_marker_loss.MarkerLoss", "params": {"path": str(marker)}}
    ckpt = _planted_checkpoint(tiny, tmp_path / "mine", _config_with_loss(tiny, loss))
    assert _run("--ckpt", str(ckpt), "--outdir", str(tmp_path / "refused")) == 2
    assert "names target 'ldm_test_marker_loss.MarkerLoss'" in capsys.readouterr().err
    assert not marker.exists() and "ldm_test_marker_loss" not in sys.modules
    assert _run("--ckpt", str(ckpt), "--outdir", str(tmp_path / "out"), "--unsafe_config") == 0
    assert marker.read_text() == "ran"
    assert [p.name for p in samples(tmp_path / "out")] == ["00000.png"]


def test_the_sidecar_is_logged_with_its_path(tiny, caplog):
    with caplog.at_level("INFO", logger="ldm.inference.loading"):
        source = loading.resolve_source(tiny[1], None)
    assert source.config_path == tiny[0]
    assert any(str(tiny[0]) in r.getMessage() and "beside the checkpoint" in r.getMessage()
               for r in caplog.records if r.levelname == "INFO")


def test_the_script_exits_2_with_one_line_as_a_subprocess(tiny, tmp_path: Path):
    marker = tmp_path / "marker"
    ckpt = _planted_checkpoint(tiny, tmp_path / "download", _config_with_loss(tiny, _popen_payload(marker)))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "txt2img.py"), "--ckpt", str(ckpt), "--prompt",
                           "p", "--outdir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("txt2img.py: error: config ") and "Traceback" not in proc.stderr
    assert "subprocess.Popen" in errors[0]
    assert f"INFO: config: using {ckpt.with_suffix('.yaml')}" in proc.stderr  # the sidecar is named when used
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_training_configs_list_their_targets():
    config = OmegaConf.load(ROOT / "configs" / "training" / "tiny-ldm.yaml")
    targets = config_targets(config)
    assert "ldm.models.diffusion.ddpm.LatentDiffusion" in targets and len(targets) == len(set(targets))
    assert config_policy.outside_policy(config) == []
    assert config_policy.outside_policy({"model": {"target": "main.DataModuleFromConfig"}}) == [
        "main.DataModuleFromConfig"]


def test_train_logs_what_its_config_builds(tmp_path: Path):
    from test_train_helpers import QUIET, TINY, load_train_script, make_images

    make_images(tmp_path / "img", 2)
    overrides = [f"data.params.train.params.root={tmp_path / 'img'}", "trainer.max_steps=1",
                 "trainer.image_log_every_n_steps=0", "trainer.val_every_n_steps=0", "data.params.batch_size=2",
                 *QUIET]
    assert load_train_script().main(["--base", str(TINY["ae"]), "-t", "--logdir", str(tmp_path / "logs"),
                                     *overrides]) == 0
    (run,) = (tmp_path / "logs").iterdir()
    lines = [line for line in (run / "train.log").read_text().splitlines() if "imports and builds" in line]
    assert len(lines) == 1 and "INFO" in lines[0]
    expected = config_targets(OmegaConf.load(TINY["ae"]))
    assert "ldm.models.autoencoder.AutoencoderKL" in expected
    assert all(target in lines[0].split("these targets: ")[1].split(", ") for target in expected)


@pytest.mark.parametrize("text, message", [
    ("model: {target: torch.nn.Identity, params: {p: " + "[" * 400 + "]" * 400 + "}}\n", "is not valid YAML"),
    ("model:\n  target: [unclosed\n  params: {}\n", "is not valid YAML"),
    ("model: {target: '" + "a" * 5000 + "'}\n", "is not a dotted class path"),
    ("model: {target: '${nowhere}'}\n", "cannot be resolved"),
])
def test_hostile_config_files_give_one_short_line(tmp_path: Path, text: str, message: str):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        loading.read_config(path)
    assert message in str(e.value) and "\n" not in str(e.value) and len(str(e.value)) < 700

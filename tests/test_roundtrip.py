"""Train -> export -> generate: every file the trainer writes generates with txt2img/img2img, with the training
config or none at all, and --use_ema / --no_ema pick the weights whenever a file holds both."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file
from test_train_helpers import QUIET, TINY, load_train_script, make_images, one_thread  # noqa: F401
from tiny_model import load_script, pixels, samples

from ldm.checkpoint import load_model_from_config

txt2img, img2img = load_script("txt2img"), load_script("img2img")
GEN = ["--prompt", "a photo of thing 1", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--seed", "3",
       "--scale", "3", "--no_safety_check", "--no_watermark", "--skip_grid"]


def _train(tmp: Path, kind: str, name: str, *overrides: str) -> Path:
    """A 2-step run of the tiny ``kind`` config through scripts/train.py; returns its run folder."""
    make_images(tmp / "img", 6, size=(32, 32))
    args = ["--base", str(TINY[kind]), "-t", "--logdir", str(tmp / "logs"), "--name", name, "--seed", "1",
            f"data.params.train.params.root={tmp / 'img'}", "trainer.max_steps=2", "data.params.batch_size=2",
            "trainer.image_log_every_n_steps=0", "trainer.val_every_n_steps=0", "trainer.checkpoint_every_n_steps=2",
            *QUIET, *overrides]
    assert load_train_script().main(args) == 0
    (run,) = (tmp / "logs").glob(f"*_{name}")
    return run


def _hand_made(ckpt: Path, out: Path, ema: bool, vae: Path | None = None) -> Path:
    """The expected weights, picked by hand from a full checkpoint: raw or EMA UNet (``model_ema.<name without
    dots>``), optionally another autoencoder; with a plain inference config (``use_ema: false``) beside them."""
    sd = torch.load(ckpt, weights_only=True)["state_dict"]
    flat = {k: v for k, v in sd.items() if not k.startswith("model_ema.")}
    if ema:
        flat.update({k: sd["model_ema." + k[len("model."):].replace(".", "")] for k in flat if k.startswith("model.")})
    if vae is not None:
        flat.update({"first_stage_model." + k: v for k, v in load_file(str(vae)).items()})
    save_file({k: v.contiguous() for k, v in flat.items()}, str(out))
    config = OmegaConf.load(TINY["ldm"])
    config.model.params.use_ema = False
    OmegaConf.save(OmegaConf.create({"model": config.model}), out.with_suffix(".yaml"))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Tiny runs: LDM with EMA, LDM without, autoencoder; and the expected weights picked by hand."""
    tmp = tmp_path_factory.mktemp("roundtrip")
    ema_run = _train(tmp, "ldm", "ema", "model.params.scheduler_config=null", "model.base_learning_rate=0.01")
    plain_run = _train(tmp, "ldm", "plain", "model.params.use_ema=false")
    ae_run = _train(tmp, "ae", "ae")
    last = ema_run / "checkpoints" / "last.ckpt"
    ae = ae_run / "checkpoints" / "last-weights.safetensors"
    (tmp / "ref").mkdir()
    return {"ema": ema_run, "plain": plain_run, "ae": ae_run,
            "ref-ema": _hand_made(last, tmp / "ref" / "ema.safetensors", ema=True),
            "ref-raw": _hand_made(last, tmp / "ref" / "raw.safetensors", ema=False),
            "ref-plain": _hand_made(plain_run / "checkpoints" / "last.ckpt", tmp / "ref" / "plain.safetensors",
                                    ema=False),
            "ref-ae": _hand_made(last, tmp / "ref" / "ema-ae.safetensors", ema=True, vae=ae)}


def _generate(script, out: Path, ckpt: Path, *extra: str) -> np.ndarray:
    assert script.main([*GEN, "--ckpt", str(ckpt), "--outdir", str(out), *extra]) == 0
    (image,) = samples(out)
    return pixels(image)


def _project_config(run: Path) -> Path:
    (saved,) = (run / "configs").glob("*-project.yaml")
    return saved


def _init_image(tmp_path: Path) -> Path:
    rng = np.random.default_rng(5)
    path = tmp_path / "init.png"
    Image.fromarray((rng.random((32, 32, 3)) * 255).astype(np.uint8)).save(path)
    return path


FULL_CASES = [  # (file, config, flag, expected weights)
    ("last.ckpt", "training", None, "ema"), ("last.ckpt", "training", "--use_ema", "ema"),
    ("last.ckpt", "training", "--no_ema", "raw"), ("last.ckpt", None, None, "ema"),
    ("last.ckpt", None, "--use_ema", "ema"), ("last.ckpt", None, "--no_ema", "raw"),
    ("step-00000002.ckpt", None, "--no_ema", "raw"), ("step-00000002.ckpt", "training", None, "ema"),
    ("last-ema.safetensors", "training", None, "ema"), ("last-ema.safetensors", None, None, "ema"),
    ("last-ema.safetensors", None, "--use_ema", "ema"),
]


@pytest.mark.parametrize("name, config, flag, expected", FULL_CASES)
def test_trained_files_generate_with_the_chosen_weights(runs, tmp_path, name, config, flag, expected, caplog):
    ckpt = runs["ema"] / "checkpoints" / name
    extra = ["--config", str(TINY["ldm"])] if config else []
    with caplog.at_level(logging.INFO, logger="ldm.inference"):
        got = _generate(txt2img, tmp_path / "got", ckpt, *extra, *([flag] if flag else []))
    want = _generate(txt2img, tmp_path / "want", runs[f"ref-{expected}"])
    np.testing.assert_array_equal(got, want)
    if name.endswith(".ckpt"):
        assert f"using the {'EMA' if expected == 'ema' else 'raw'}" in caplog.text  # the choice is logged


def test_ema_and_raw_pictures_differ(runs, tmp_path):
    """The EMA and raw weights of the 2-step run give different pictures, so the cases above tell them apart."""
    ema = _generate(txt2img, tmp_path / "e", runs["ref-ema"])
    raw = _generate(txt2img, tmp_path / "r", runs["ref-raw"])
    assert np.abs(ema.astype(int) - raw.astype(int)).mean() > 5


@pytest.mark.parametrize("config", ["training", None])
def test_raw_weights_export_of_a_run_without_ema(runs, tmp_path, config):
    ckpt = runs["plain"] / "checkpoints" / "last-weights.safetensors"
    extra = ["--config", str(_project_config(runs["plain"]))] if config else []
    got = _generate(txt2img, tmp_path / "got", ckpt, *extra)
    np.testing.assert_array_equal(got, _generate(txt2img, tmp_path / "want", runs["ref-plain"]))


@pytest.mark.parametrize("flag, expected", [(None, "ema"), ("--no_ema", "raw")])
def test_img2img_with_a_full_checkpoint(runs, tmp_path, flag, expected):
    init = ["--init-img", str(_init_image(tmp_path)), "--strength", "0.5"]
    ckpt = runs["ema"] / "checkpoints" / "last.ckpt"
    got = _generate(img2img, tmp_path / "got", ckpt, *init, *([flag] if flag else []))
    np.testing.assert_array_equal(got, _generate(img2img, tmp_path / "want", runs[f"ref-{expected}"], *init))


def test_autoencoder_export_as_vae_and_with_its_configs(runs, tmp_path):
    ae = runs["ae"] / "checkpoints" / "last-weights.safetensors"
    ema = runs["ema"] / "checkpoints" / "last-ema.safetensors"
    got = _generate(txt2img, tmp_path / "got", ema, "--vae", str(ae))
    np.testing.assert_array_equal(got, _generate(txt2img, tmp_path / "want", runs["ref-ae"]))
    full = torch.load(runs["ae"] / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for config in (OmegaConf.load(TINY["ae"]), OmegaConf.load(ae.with_suffix(".yaml"))):
        model = load_model_from_config(config, ae)
        for key, value in model.state_dict().items():
            if not key.startswith("loss."):
                assert torch.equal(value, full[key]), key


def test_autoencoder_with_ema_exports_its_ema_weights(tmp_path):
    run = _train(tmp_path, "ae", "ae-ema", "model.params.ema_decay=0.5", "model.base_learning_rate=0.01")
    full = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    path = run / "checkpoints" / "last-ema.safetensors"
    export = load_file(str(path))
    key = "decoder.conv_out.weight"
    assert torch.equal(export[key], full["model_ema." + key.replace(".", "")])
    assert not torch.equal(export[key], full[key])
    assert not any(k.startswith(("loss.", "model_ema.")) for k in export)
    model = load_model_from_config(OmegaConf.load(path.with_suffix(".yaml")), path)
    assert torch.equal(model.state_dict()[key], export[key])


def test_exports_carry_an_inference_config_of_project_targets(runs):
    from ldm.training.export import targets

    for run, name in ((runs["ema"], "last-ema"), (runs["plain"], "last-weights"), (runs["ae"], "last-weights"),
                      (runs["ema"], "last")):
        config = OmegaConf.to_container(OmegaConf.load(run / "checkpoints" / f"{name}.yaml"))
        assert set(config) == {"model"}
        assert all(t.startswith("ldm.") or t == "torch.nn.Identity" for t in targets(config))
        assert not {"ckpt_path", "scheduler_config", "base_learning_rate"} & set(config["model"]["params"])
        for suffix in (".yaml", ".safetensors" if name != "last" else ".ckpt"):
            assert (run / "checkpoints" / f"{name}{suffix}").stat().st_mode & 0o777 == 0o644


def test_inference_config_of_a_fine_tuning_config_loads_nothing_else():
    """The SD 2 fine-tuning config: the export's config names no checkpoint to load, keeps no training parts."""
    from ldm.training.config import load_config
    from ldm.training.export import inference_config, targets

    root = TINY["ldm"].parents[1]
    cfg = load_config([root / "stable-diffusion" / "v2-inference.yaml", root / "training" / "sd2-finetune.yaml"],
                      ["model.params.ckpt_path=/m/512-base-ema.ckpt", "data.params.train.params.urls=/d/a.tar"])
    config = inference_config(cfg)
    text = OmegaConf.to_yaml(OmegaConf.create(config))
    assert "ckpt_path" not in text and "/m/512" not in text and "scheduler_config" not in text
    params = config["model"]["params"]
    assert params["use_ema"] is False and params["first_stage_config"]["params"]["lossconfig"] == {
        "target": "torch.nn.Identity"}
    assert all(t.startswith("ldm.") or t == "torch.nn.Identity" for t in targets(config))
    cfg.model.params.unet_config.target = "os.system"
    assert inference_config(cfg) is None  # a config naming foreign code gets no sidecar

"""LatentDiffusion training on CPU with the tiny config: outputs, checkpoint contents, resume, over-fitting."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from test_train_helpers import make_images, one_thread, read_metrics, run_training, tiny_config  # noqa: F401

from ldm.data.datamodule import collate, strip_bookkeeping
from ldm.training.distributed import DistContext
from ldm.training.trainer import RunOptions, Trainer

FAST = ["trainer.checkpoint_every_n_steps=2", "trainer.log_every_n_steps=1", "trainer.val_every_n_steps=0",
        "trainer.image_log_every_n_steps=0", "data.params.batch_size=2"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    make_images(root, 10, corrupt=1)
    return root


def test_a_few_steps_write_checkpoints_metrics_images_and_ema_export(images, tmp_path):
    cfg = tiny_config("ldm", images, [*FAST, "trainer.max_steps=4", "trainer.val_every_n_steps=2",
                                      "trainer.image_log_every_n_steps=4", "trainer.sample_steps=2",
                                      "trainer.limit_val_batches=1", "trainer.log_images=2"])
    run_training(cfg, tmp_path)
    ckpts = tmp_path / "checkpoints"
    written = {"last.ckpt", "step-00000002.ckpt", "step-00000004.ckpt", "last-ema.safetensors"}
    configs = {n.rsplit(".", 1)[0] + ".yaml" for n in written}  # each with its inference config beside it
    assert {p.name for p in ckpts.iterdir()} == written | configs
    ckpt = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)  # plain data only
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == 4 and len(ckpt["optimizer_states"]) == 1 and len(ckpt["rank_states"]) == 1
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 4
    assert "ucg" in ckpt["rank_states"][0]["rng"]["generators"]  # the CFG-dropout stream resumes too
    for prefix in ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.model.", "model_ema."):
        assert any(k.startswith(prefix) for k in sd), prefix
    assert "betas" in sd and "alphas_cumprod" in sd and int(sd["model_ema.num_updates"]) == 4
    ema = load_file(str(ckpts / "last-ema.safetensors"))
    assert not any(k.startswith("model_ema.") for k in ema)
    assert set(ema) == {k for k in sd if not k.startswith("model_ema.")}
    w = "model.diffusion_model.out.2.weight"
    assert torch.equal(ema[w], sd["model_ema.diffusion_modelout2weight"]) and not torch.equal(ema[w], sd[w])
    losses = read_metrics(tmp_path, "train/loss")
    assert sorted(losses) == [1, 2, 3, 4] and all(math.isfinite(v) for v in losses.values())
    assert read_metrics(tmp_path, "data/skipped_samples")[4] >= 0
    assert "val/loss_simple_ema" in (tmp_path / "metrics.csv").read_text()
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
    assert {p.name for p in (tmp_path / "images" / "train").iterdir()} >= {"samples_step-00000004.png",
                                                                            "inputs_step-00000004.png"}


def test_resumed_run_repeats_the_uninterrupted_one(images, tmp_path):
    full = tiny_config("ldm", images, [*FAST, "trainer.max_steps=4", "trainer.val_every_n_steps=1",
                                       "trainer.limit_val_batches=1"])
    run_training(full, tmp_path / "full", seed=3)
    part = tiny_config("ldm", images, [*FAST, "trainer.max_steps=2"])
    run_training(part, tmp_path / "split", seed=3)
    rest = tiny_config("ldm", images, [*FAST, "trainer.max_steps=4"])
    run_training(rest, tmp_path / "split", seed=3, resume=tmp_path / "split" / "checkpoints" / "last.ckpt")
    assert read_metrics(tmp_path / "split", "train/loss") == read_metrics(tmp_path / "full", "train/loss")
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    assert a["rank_states"][0]["data"] == b["rank_states"][0]["data"]


def _fixed_loss(model: torch.nn.Module, batch: dict) -> float:
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        x, c = model.get_input(batch, model.first_stage_key)
        t = torch.linspace(50, 950, x.shape[0]).long()
        return float(model.p_losses(x, c, t, noise=torch.randn_like(x))[0])


def test_loss_falls_when_overfitting_one_batch(tmp_path):
    root = tmp_path / "two"
    make_images(root, 2, size=(32, 32))
    cfg = tiny_config("ldm", root, [*FAST, "trainer.max_steps=30", "trainer.checkpoint_every_n_steps=100",
                                    "trainer.export_ema=false", "data.params.validation_fraction=0",
                                    "model.params.ucg_training=null", "model.params.scheduler_config=null",
                                    "data.params.train.params.random_crop=false",
                                    "data.params.train.params.flip_p=0", "model.base_learning_rate=3e-3"])
    trainer = Trainer(cfg, RunOptions(logdir=tmp_path / "run", seed=0, scale_lr=False), DistContext())
    trainer.data.setup()
    batch = strip_bookkeeping(collate([trainer.data.train[0], trainer.data.train[1]]))
    before = _fixed_loss(trainer.model, batch)
    trainer.fit()
    after = _fixed_loss(trainer.model, batch)
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("overrides", [
    ["trainer.precision=bf16", "model.params.parameterization=v", "trainer.accumulate_grad_batches=2"],
    ["trainer.precision=16", "model.params.scale_by_std=true", "model.params.scale_factor=1.0"],
], ids=["bf16-v-accumulate", "fp16-scale_by_std"])
def test_precisions_parameterizations_and_scale_by_std(images, tmp_path, overrides):
    cfg = tiny_config("ldm", images, [*FAST, "trainer.max_steps=2", "trainer.export_ema=false", *overrides])
    trainer = run_training(cfg, tmp_path)
    losses = read_metrics(tmp_path, "train/loss")
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses.values())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    if "model.params.scale_by_std=true" in overrides:
        assert not math.isclose(float(trainer.model.scale_factor), 1.0)
        assert float(ckpt["state_dict"]["scale_factor"]) == float(trainer.model.scale_factor)
        assert ckpt["grad_scalers"][0]["scale"] > 0  # the fp16 loss scaler is saved for resume
    else:
        assert trainer.model.parameterization == "v"
        assert trainer.position.samples == 2 * 2 * 2  # 2 steps x 2 micro-batches x batch size 2

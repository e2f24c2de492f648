"""AutoencoderKL training on CPU with the tiny config: GAN schedule, checkpoint layout, LPIPS notice, over-fitting."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from safetensors.torch import load_file
from test_train_helpers import make_images, one_thread, read_metrics, run_training, tiny_config  # noqa: F401

from ldm.data.datamodule import collate, strip_bookkeeping
from ldm.training.distributed import DistContext
from ldm.training.trainer import RunOptions, Trainer

FAST = ["trainer.log_every_n_steps=1", "trainer.val_every_n_steps=0", "trainer.image_log_every_n_steps=0",
        "data.params.batch_size=2"]


def test_autoencoder_trains_with_gan_after_disc_start(tmp_path, caplog):
    make_images(tmp_path / "img", 6)
    cfg = tiny_config("ae", tmp_path / "img", [*FAST, "trainer.max_steps=4", "trainer.checkpoint_every_n_steps=4",
                                               "model.params.lossconfig.params.disc_start=2",
                                               "trainer.val_every_n_steps=4", "trainer.image_log_every_n_steps=4"])
    with caplog.at_level(logging.WARNING):
        run_training(cfg, tmp_path / "run")
    assert "LPIPS perceptual loss OFF" in caplog.text
    factor = read_metrics(tmp_path / "run", "train/disc_factor")
    assert [factor[s] for s in (1, 2, 3, 4)] == [0.0, 0.0, 1.0, 1.0]  # steps 0, 1 before disc_start=2
    d_weight = read_metrics(tmp_path / "run", "train/d_weight")
    assert all(v > 0 and math.isfinite(v) for v in d_weight.values())  # the adaptive weight is computed
    assert read_metrics(tmp_path / "run", "train/disc_loss")[4] > 0
    assert 4 in read_metrics(tmp_path / "run", "val/rec_loss")
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    sd = ckpt["state_dict"]
    assert len(ckpt["optimizer_states"]) == 2 and ckpt["global_step"] == 4
    assert {"encoder.conv_in.weight", "decoder.conv_out.weight", "quant_conv.weight", "loss.logvar",
            "loss.discriminator.main.0.weight"} <= set(sd)
    weights = load_file(str(tmp_path / "run" / "checkpoints" / "last-weights.safetensors"))
    assert not any(k.startswith("loss.") for k in weights) and torch.equal(weights["quant_conv.weight"],
                                                                           sd["quant_conv.weight"])
    assert (tmp_path / "run" / "images" / "train" / "reconstructions_step-00000004.png").exists()


def test_autoencoder_overfits_one_batch(tmp_path):
    make_images(tmp_path / "img", 2, size=(32, 32))
    cfg = tiny_config("ae", tmp_path / "img", [*FAST, "trainer.max_steps=25", "trainer.checkpoint_every_n_steps=100",
                                               "trainer.export_ema=false", "data.params.validation_fraction=0",
                                               "data.params.train.params.random_crop=false",
                                               "data.params.train.params.flip_p=0",
                                               "model.params.lossconfig.params.disc_start=1000"])
    trainer = Trainer(cfg, RunOptions(logdir=tmp_path / "run", seed=0, scale_lr=False), DistContext())
    trainer.data.setup()
    batch = strip_bookkeeping(collate([trainer.data.train[0], trainer.data.train[1]]))
    x = batch["image"].permute(0, 3, 1, 2)

    def l1() -> float:
        with torch.no_grad():
            return float((trainer.model(x, sample_posterior=False)[0] - x).abs().mean())

    before = l1()
    trainer.fit()
    assert l1() < 0.6 * before


def test_resume_of_the_two_optimizer_task_is_exact(tmp_path):
    make_images(tmp_path / "img", 6)
    common = [*FAST, "trainer.checkpoint_every_n_steps=2", "model.params.lossconfig.params.disc_start=1"]
    run_training(tiny_config("ae", tmp_path / "img", [*common, "trainer.max_steps=4"]), tmp_path / "full")
    run_training(tiny_config("ae", tmp_path / "img", [*common, "trainer.max_steps=2"]), tmp_path / "split")
    run_training(tiny_config("ae", tmp_path / "img", [*common, "trainer.max_steps=4"]), tmp_path / "split",
                 resume=tmp_path / "split" / "checkpoints" / "step-00000002.ckpt")
    for key in ("train/total_loss", "train/disc_loss"):
        assert read_metrics(tmp_path / "split", key) == read_metrics(tmp_path / "full", key)

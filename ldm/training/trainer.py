"""The training loop: data, optimizer steps, metrics, validation, image grids, checkpoints, resume."""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.data.datamodule import TARGET_ALIASES, DataModuleFromConfig, DataPosition, strip_bookkeeping
from ldm.data.sampler import mix_seed
from ldm.training import checkpoint as ckpt_io
from ldm.training.config import (TrainerSettings, base_learning_rate, check_complete, check_sections,
                                 effective_learning_rate, model_config, settings_dict, trainer_settings)
from ldm.training.distributed import (DistContext, all_reduce_mean, all_reduce_sum, broadcast_object,
                                      gather_objects)
from ldm.training.export import inference_config
from ldm.training.images import save_grids
from ldm.training.metrics import MeanAccumulator, MetricsLogger
from ldm.training.optim import Precision
from ldm.training.stopping import StopRequest
from ldm.training.task_autoencoder import AutoencoderTask
from ldm.training.task_common import fork_rng
from ldm.training.task_diffusion import DiffusionTask
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)
CHECKPOINT_FORMAT = 1


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices) with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


@dataclass
class RunOptions:
    """What the command line decides: where to write, the seed, lr scaling, the checkpoint to resume."""

    logdir: Path
    seed: int = 23
    scale_lr: bool = False
    resume: Path | None = None
    callbacks: Sequence[Any] = field(default_factory=list)


def build_data(section: DictConfig | dict) -> DataModuleFromConfig:
    """The data module of the ``data:`` section (``main.DataModuleFromConfig`` is read as ours)."""
    section = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    target = TARGET_ALIASES.get(section.get("target", ""), section.get("target") or
                                "ldm.data.datamodule.DataModuleFromConfig")
    return instantiate_from_config({"target": target, "params": section.get("params") or {}})


def make_task(model: nn.Module, ctx: DistContext, precision: Precision, lr: float, settings: TrainerSettings,
              cfg: DictConfig, seed: int) -> DiffusionTask | AutoencoderTask:
    """The training task that fits ``model``: a diffusion model (DDPM/LatentDiffusion) or an AutoencoderKL."""
    if hasattr(model, "shared_step") and isinstance(getattr(model, "model", None), nn.Module):
        sched = (cfg.model.get("params") or {}).get("scheduler_config")
        sched = OmegaConf.to_container(sched, resolve=True) if isinstance(sched, DictConfig) else sched
        return DiffusionTask(model, ctx, precision, lr, sched, settings.gradient_clip_val,
                             mix_seed(seed, ctx.rank, 11))
    if hasattr(model, "get_last_layer") and hasattr(model, "loss"):
        return AutoencoderTask(model, ctx, precision, lr, settings.gradient_clip_val)
    raise TypeError(f"don't know how to train {type(model).__name__}: expected a diffusion model (shared_step and a "
                    f"'model' network) or an AutoencoderKL (get_last_layer, loss)")


class Trainer:
    """Plain-PyTorch trainer for the ``model``/``data``/``trainer`` config; one instance per process."""

    def __init__(self, cfg: DictConfig, opts: RunOptions, ctx: DistContext) -> None:
        check_sections(cfg)
        check_complete(cfg)
        self.cfg, self.opts, self.ctx = cfg, opts, ctx
        self.settings = trainer_settings(cfg)
        self.inference_config = inference_config(cfg) if ctx.is_main else None
        self.logdir, self.ckpt_dir = Path(opts.logdir), Path(opts.logdir) / "checkpoints"
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = self.settings.cudnn_benchmark
        seed_everything(opts.seed)
        self.data = build_data(cfg.data)
        self.data.setup()  # bad data folders are reported before anything is written
        self.model = instantiate_from_config(model_config(cfg)).to(ctx.device)
        if cfg.get("lora") is not None:  # LoRA fine-tuning: frozen base, adapters only (ldm.modules.lora.train)
            from ldm.modules.lora.train import apply_lora_section
            apply_lora_section(self.model, cfg.lora)
        accumulate = self.settings.accumulate_grad_batches
        self.lr = effective_learning_rate(base_learning_rate(cfg), self.data.batch_size, accumulate,
                                          ctx.world_size, opts.scale_lr)
        self.model.learning_rate = self.lr
        self.step, self.resumed, self.position = 0, False, DataPosition()
        self.interrupted: str | None = None
        state = ckpt_io.read_training_checkpoint(opts.resume) if opts.resume else None
        if state is not None:
            ckpt_io.check_resumable(state, Path(opts.resume))
            self._load_weights(state)
        self.task = make_task(self.model, ctx, Precision(self.settings.precision, ctx.device), self.lr,
                              self.settings, cfg, opts.seed)
        if state is not None:
            self._load_training_state(state)
        else:
            seed_everything(mix_seed(opts.seed, ctx.rank) % 2 ** 31)

    # ----------------------------------------------------------------------------------------- resume
    def _load_weights(self, state: dict[str, Any]) -> None:
        from ldm.checkpoint import CheckpointError

        model_sd = self.model.state_dict()
        sd = state["state_dict"]
        wrong = [k for k in model_sd if k in sd and tuple(sd[k].shape) != tuple(model_sd[k].shape)]
        missing, unexpected = [k for k in model_sd if k not in sd], [k for k in sd if k not in model_sd]
        if missing or unexpected or wrong:
            raise CheckpointError(f"checkpoint {self.opts.resume} does not fit the model of this config: "
                                  f"{len(missing)} missing keys {missing[:3]}, {len(unexpected)} unexpected "
                                  f"{unexpected[:3]}, {len(wrong)} of another shape {wrong[:3]}")
        self.model.load_state_dict(sd)
        self.step, self.resumed = int(state["global_step"]), True
        logger.info("resuming from %s at step %d", self.opts.resume, self.step)

    def _load_training_state(self, state: dict[str, Any]) -> None:
        slots = self.task.slots
        for slot, opt, sched, scaler in zip(slots, state["optimizer_states"], state["lr_schedulers"],
                                            state["grad_scalers"]):
            slot.load_state_dict({"optimizer": opt, "lr_scheduler": sched, "grad_scaler": scaler})
        ranks = state.get("rank_states") or []
        if len(ranks) == self.ctx.world_size:
            ckpt_io.set_rng_state(ranks[self.ctx.rank]["rng"], self.task.generators)
            self.position = DataPosition(ranks[self.ctx.rank]["data"])
            return
        logger.warning("the checkpoint was written by %d processes, this run has %d: random streams and data "
                       "positions restart, so the run continues but not sample-exactly", len(ranks),
                       self.ctx.world_size)
        seed_everything(mix_seed(self.opts.seed, self.ctx.rank, self.step) % 2 ** 31)
        if ranks:
            self.position = DataPosition({"samples": ranks[0]["data"].get("samples", 0)})

    # ----------------------------------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict[str, Any] | None:
        """The full checkpoint (on rank 0; None elsewhere). Collective: every rank must call it."""
        rank_state = {"rng": ckpt_io.rng_state(self.task.generators), "data": self.position.state_dict()}
        rank_states = gather_objects(rank_state, self.ctx)
        if not self.ctx.is_main:
            return None
        slot_states = [s.state_dict() for s in self.task.slots]
        return {
            "state_dict": self.model.state_dict(), "global_step": self.step, "epoch": 0,
            "optimizer_states": [s["optimizer"] for s in slot_states],
            "lr_schedulers": [s["lr_scheduler"] for s in slot_states],
            "grad_scalers": [s["grad_scaler"] for s in slot_states],
            "rank_states": rank_states, "world_size": self.ctx.world_size, "seed": self.opts.seed,
            "config": OmegaConf.to_container(self.cfg, resolve=True), "trainer": settings_dict(self.settings),
            "format_version": CHECKPOINT_FORMAT,
        }

    def save(self, numbered: bool) -> Path | None:
        """Write ``last.ckpt`` (and ``step-N.ckpt`` when ``numbered``) from rank 0. Collective."""
        state = self.checkpoint_state()
        if state is None:
            return None
        path = ckpt_io.write_checkpoint(state, self.ckpt_dir, self.step, numbered,
                                        self.settings.keep_last_n_checkpoints, self.inference_config)
        logger.info("checkpoint written: %s (step %d)", path, self.step)
        return path

    def export_inference_weights(self) -> Path:
        """EMA-only (or plain, without EMA) inference weights of the current model as safetensors."""
        if self.cfg.get("lora") is not None:
            from ldm.modules.lora.train import save_kohya
            return save_kohya(self.model, self.ckpt_dir / "last-lora.safetensors")
        has_ema = getattr(self.model, "use_ema", False)
        name = "last-ema.safetensors" if has_ema else "last-weights.safetensors"
        return ckpt_io.export_ema(self.model.state_dict(), self.ckpt_dir / name, self.inference_config, force=True)

    # ----------------------------------------------------------------------------------------- loop
    def _batches(self, it: Iterator[dict[str, Any]]) -> list[dict[str, Any]]:
        batches = []
        for _ in range(self.settings.accumulate_grad_batches):
            batch = next(it)
            self.position.update(batch)
            for cb in self.opts.callbacks:
                if hasattr(cb, "on_train_batch"):
                    cb.on_train_batch(self, batch)
            batches.append(strip_bookkeeping(batch))
        return batches

    def fit(self) -> dict[str, float]:
        """Train until ``trainer.max_steps``; returns the last logged values.

        SIGINT (Ctrl-C) or SIGTERM ends the current step, saves ``last.ckpt`` and returns early with
        ``self.interrupted`` naming the signal: resuming from there is the uninterrupted run.
        """
        s, ctx = self.settings, self.ctx
        if ctx.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.remove_stale_temporaries(self.ckpt_dir)
        saved_at = self.step if self.resumed else -1
        with StopRequest() as stop:
            last_logs, saved_at = self._loop(stop, saved_at)
            self.interrupted = stop.signal_name if self.step < self.settings.max_steps else None
            if saved_at != self.step:
                self.save(numbered=not self.interrupted)
        if self.interrupted:
            logger.warning("stopped at step %d (%s); last.ckpt holds that step", self.step, self.interrupted)
            return last_logs
        if ctx.is_main and s.export_ema:
            self.export_inference_weights()
        for cb in self.opts.callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self)
        return last_logs

    def _loop(self, stop: StopRequest, saved_at: int) -> tuple[dict[str, float], int]:
        """The optimizer steps up to ``max_steps`` or a stop request; (last logged values, last saved step)."""
        from tqdm.auto import tqdm

        s, ctx = self.settings, self.ctx
        metrics = MetricsLogger(self.logdir, self.step if self.resumed else None, s.tensorboard) \
            if ctx.is_main else None
        loader = self.data.train_loader(ctx.rank, ctx.world_size, self.opts.seed, self.position,
                                        pin_memory=ctx.device.type == "cuda")
        it, acc, last_logs = iter(loader), MeanAccumulator(), {}
        bar = tqdm(total=s.max_steps, initial=self.step, disable=not (ctx.is_main and s.progress_bar),
                   desc="train", unit="step", dynamic_ncols=True)
        self.task.train()
        try:
            while self.step < s.max_steps and not stop.agreed(ctx):
                batches = self._batches(it)
                if self.step == 0 and not self.resumed:
                    self.task.estimate_scale_factor(batches[0])
                acc.add(self.task.train_step(batches, self.step))
                self.step += 1
                bar.update(1)
                last_logs = self._after_step(batches[-1], acc, metrics, bar) or last_logs
                if self.step % s.checkpoint_every_n_steps == 0 or self.step == s.max_steps:
                    self.save(numbered=True)
                    saved_at = self.step
        finally:
            bar.close()
            if metrics is not None:
                metrics.close()
        return last_logs, saved_at

    # ----------------------------------------------------------------------------------------- feedback
    def _after_step(self, batch: dict[str, Any], acc: MeanAccumulator, metrics: MetricsLogger | None,
                    bar: Any) -> dict[str, float] | None:
        """Metrics, validation and image grids due at this step; returns the logged values, if logged."""
        s, logged = self.settings, None
        if self.step % s.log_every_n_steps == 0 or self.step == s.max_steps:
            logged = self._log(acc, metrics, bar)
        if s.val_every_n_steps and self.step % s.val_every_n_steps == 0:
            self.validate(metrics)
        if s.image_log_every_n_steps and self.step % s.image_log_every_n_steps == 0 and self.ctx.is_main:
            self.log_images(batch, "train")
        return logged

    def _log(self, acc: MeanAccumulator, metrics: MetricsLogger | None, bar: Any) -> dict[str, float]:
        """Average the values since the last log over steps and ranks; write them (rank 0). Collective."""
        means = acc.reduce()
        keys = sorted(means)
        vec = torch.stack([means[k].to(self.ctx.device) for k in keys]) if keys else torch.zeros(0)
        vec = all_reduce_mean(vec.to(self.ctx.device), self.ctx).cpu()
        values = {k: float(v) for k, v in zip(keys, vec)}
        skipped = all_reduce_sum(torch.tensor([float(self.position.skipped)], device=self.ctx.device), self.ctx)
        values["data/skipped_samples"] = float(skipped.item())
        if metrics is not None:
            metrics.log(self.step, values)
            metrics.plot()
            shown = {k.split("/")[-1]: f"{v:.4g}" for k, v in values.items() if k.endswith(("/loss", "total_loss"))}
            bar.set_postfix(shown, refresh=False)
        return values

    @torch.no_grad()
    def validate(self, metrics: MetricsLogger | None) -> dict[str, float]:
        """Mean validation losses over ``limit_val_batches`` batches of every rank (fixed noise). Collective."""
        loader = self.data.val_loader(self.ctx.rank, self.ctx.world_size, self.opts.seed)
        if loader is None:
            return {}
        self.model.eval()
        sums: dict[str, torch.Tensor] = {}
        count, first = 0, None
        with fork_rng(self.ctx.device, seed=mix_seed(self.opts.seed, self.ctx.rank, 99) % 2 ** 31):
            for i, batch in enumerate(loader):
                if i >= self.settings.limit_val_batches:
                    break
                batch = strip_bookkeeping(batch)
                first = first if first is not None else batch
                for k, v in self.task.validation_step(batch, self.step).items():
                    sums[k] = sums.get(k, 0.0) + v.cpu()
                count += 1
        keys = broadcast_object(sorted(sums), self.ctx)
        vec = torch.tensor([float(sums.get(k, 0.0)) for k in keys] + [float(count)], device=self.ctx.device)
        vec = all_reduce_sum(vec, self.ctx).cpu()
        values = {k: float(v) / max(float(vec[-1]), 1.0) for k, v in zip(keys, vec[:-1])}
        if metrics is not None and values:
            metrics.log(self.step, values)
        if self.ctx.is_main and first is not None and self.settings.image_log_every_n_steps:
            self.log_images(first, "val")
        self.task.train()
        return values

    def log_images(self, batch: dict[str, Any], split: str) -> list[Path]:
        """Image grids of ``batch`` under ``images/<split>`` (eval mode, own RNG: training is unaffected)."""
        s = self.settings
        self.model.eval()
        try:
            with fork_rng(self.ctx.device, seed=mix_seed(self.opts.seed, self.step) % 2 ** 31):
                out = self.task.log_images(batch, s.log_images, s.sample_steps, s.sample_guidance_scale,
                                           s.sample_eta)
            return save_grids(out["rows"], self.logdir / "images" / split, self.step, out["captions"])
        finally:
            self.task.train()

"""Training step of LatentDiffusion: frozen first/cond stages, CFG dropout, EMA, AdamW, LR schedule, samples."""
from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ldm.training.distributed import DistContext, all_reduce_sum
from ldm.training.optim import OptimizerSlot, Precision, build_scheduler, trainable
from ldm.training.task_common import batch_to, fork_rng, grad_sync, images_nchw, wrap_ddp

logger = logging.getLogger(__name__)


class _LossStep(nn.Module):
    """What DistributedDataParallel wraps: ``batch -> model.shared_step(batch)`` = (loss, loss_dict)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, dict]:
        return self.model.shared_step(batch)


class DiffusionTask:
    """Optimises ``model.model`` (+ the cond stage when trainable, + logvar when learned) of a LatentDiffusion."""

    def __init__(self, model: nn.Module, ctx: DistContext, precision: Precision, lr: float,
                 scheduler_config: Mapping | None, clip: float, seed: int) -> None:
        self.model, self.ctx, self.precision = model, ctx, precision
        params = list(model.model.parameters())
        if getattr(model, "cond_stage_trainable", False):
            params += list(model.cond_stage_model.parameters())
        if getattr(model, "learn_logvar", False):
            params.append(model.logvar)
        params = trainable(params)
        if not params:
            raise ValueError("LatentDiffusion has no trainable parameters")
        optimizer = torch.optim.AdamW(params, lr=lr)
        self.slots = [OptimizerSlot("train", optimizer, params, precision.grad_scaler(),
                                    build_scheduler(optimizer, scheduler_config), clip)]
        self.ucg_training = dict(getattr(model, "ucg_training", None) or {})
        # the model draws its conditioning dropout from ucg_prng (unseeded in the original): seed it per rank
        # and keep its state in checkpoints, so that runs repeat and resume exactly
        self.ucg_prng = np.random.RandomState(seed % 2 ** 32)
        model.ucg_prng = self.ucg_prng
        self.step_module = wrap_ddp(_LossStep(model), ctx)
        logger.info("training %d parameter tensors (%.1fM values) with AdamW, lr %.2e; EMA %s; CFG dropout %s",
                    len(params), sum(p.numel() for p in params) / 1e6, lr,
                    "on" if getattr(model, "use_ema", False) else "off", self.ucg_training or "off")

    @property
    def generators(self) -> dict[str, np.random.RandomState]:
        """Task-owned RNGs whose state goes into checkpoints."""
        return {"ucg": self.ucg_prng}

    def train(self) -> None:
        """Training mode (the model keeps its frozen stages in eval mode)."""
        self.model.train()

    def train_step(self, batches: list[dict[str, Any]], step: int) -> dict[str, Any]:
        """One optimizer step over ``len(batches)`` micro-batches; returns the values to log."""
        slot, n = self.slots[0], len(batches)
        logs: dict[str, Any] = {}
        for i, batch in enumerate(batches):
            batch = batch_to(batch, self.ctx.device)
            with grad_sync(self.step_module, i == n - 1):
                with self.precision.autocast():
                    loss, loss_dict = self.step_module(batch)
                slot.backward(loss / n)
            for k, v in loss_dict.items():
                logs[k] = logs.get(k, 0.0) + v.detach().float() / n
        logs.update(slot.step())
        if getattr(self.model, "use_ema", False):
            self.model.model_ema(self.model.model)
        logs["lr_abs"] = slot.lr
        return logs

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Validation losses with the raw weights and (``*_ema``) with the EMA weights."""
        batch = batch_to(batch, self.ctx.device)
        with self.precision.autocast():
            _, logs = self.model.shared_step(batch)
            if getattr(self.model, "use_ema", False):
                with self.model.ema_scope():
                    _, ema_logs = self.model.shared_step(batch)
                logs.update({f"{k}_ema": v for k, v in ema_logs.items()})
        return {k: v.detach().float() for k, v in logs.items()}

    @torch.no_grad()
    def estimate_scale_factor(self, batch: dict[str, Any]) -> None:
        """``scale_by_std``: set ``scale_factor = 1 / std(latents)`` of the first batch (pooled over ranks)."""
        model = self.model
        if not getattr(model, "scale_by_std", False) or getattr(model, "restarted_from_ckpt", False):
            return
        if not math.isclose(float(model.scale_factor), 1.0):
            logger.warning("scale_by_std: keeping the configured scale_factor %g (the estimate is made only from "
                           "1.0, as the original)", float(model.scale_factor))
            return
        x = images_nchw(batch, model.first_stage_key, self.ctx.device)
        with fork_rng(self.ctx.device), self.precision.autocast():
            z = model.get_first_stage_encoding(model.encode_first_stage(x)).detach().double()
        stats = all_reduce_sum(torch.stack([z.sum(), (z * z).sum(), torch.tensor(float(z.numel()), device=z.device,
                                                                                dtype=z.dtype)]), self.ctx)
        s1, s2, count = stats.tolist()
        std = math.sqrt(max((s2 - s1 * s1 / count) / max(count - 1, 1), 1e-12))
        if isinstance(model.scale_factor, torch.Tensor):
            model.scale_factor.fill_(1.0 / std)
        else:
            model.scale_factor = 1.0 / std
        logger.info("scale_by_std: latent std %.5f -> scale_factor %.5f", std, 1.0 / std)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int, steps: int, guidance: float, eta: float) -> dict[str, Any]:
        """Inputs, first-stage reconstructions and DDIM samples (EMA weights, CFG) for the first ``n`` captions."""
        from ldm.models.diffusion.ddim import DDIMSampler

        model = self.model
        x = images_nchw(batch, model.first_stage_key, self.ctx.device)[:n]
        captions = list(batch[model.cond_stage_key])[:n]
        with self.precision.autocast():
            z = model.get_first_stage_encoding(model.encode_first_stage(x))
            rows = {"inputs": x, "reconstructions": model.decode_first_stage(z)}
            with model.ema_scope() if getattr(model, "use_ema", False) else contextlib.nullcontext():
                c = model.get_learned_conditioning(captions)
                uc = model.get_learned_conditioning([""] * len(captions)) if guidance != 1.0 else None
                samples, _ = DDIMSampler(model).sample(S=steps, batch_size=len(captions), shape=tuple(z.shape[1:]),
                                                       conditioning=c, unconditional_guidance_scale=guidance,
                                                       unconditional_conditioning=uc, eta=eta, verbose=False)
                rows["samples"] = model.decode_first_stage(samples)
        return {"rows": {k: v.float() for k, v in rows.items()}, "captions": captions}

"""Training step of AutoencoderKL: the autoencoder optimizer (L1/LPIPS + KL + adaptive GAN) then the discriminator."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from ldm.training.distributed import DistContext, all_reduce_mean
from ldm.training.optim import OptimizerSlot, Precision, trainable
from ldm.training.task_common import grad_sync, images_nchw, set_requires_grad, wrap_ddp

logger = logging.getLogger(__name__)
ADAM_BETAS = (0.5, 0.9)


class _GeneratorStep(nn.Module):
    """``x [B,3,H,W] -> (loss, log, reconstruction)`` for optimizer 0 (what DDP wraps)."""

    def __init__(self, ae: nn.Module) -> None:
        super().__init__()
        self.ae = ae

    def forward(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
        recon, posterior = self.ae(x)
        loss, log = self.ae.loss(x, recon, posterior, 0, step, last_layer=self.ae.get_last_layer(), split="train")
        return loss, log, recon.detach()


class _DiscriminatorStep(nn.Module):
    """``(x, reconstruction) -> (loss, log)`` for optimizer 1; holds only the discriminator's parameters."""

    def __init__(self, ae: nn.Module) -> None:
        super().__init__()
        self.discriminator = ae.loss.discriminator
        self._loss = [ae.loss]  # not a submodule: its other parameters belong to the generator step

    def forward(self, x: torch.Tensor, recon: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        return self._loss[0](x, recon, None, 1, step, split="train")


class AutoencoderTask:
    """Adam (betas 0.5, 0.9) on encoder/decoder/quant convs (+ loss.logvar when learned) and on the discriminator."""

    def __init__(self, model: nn.Module, ctx: DistContext, precision: Precision, lr: float, clip: float) -> None:
        if not hasattr(model.loss, "discriminator"):
            raise ValueError("AutoencoderKL training needs lossconfig target ldm.modules.losses.LPIPSWithDiscriminator "
                             f"(got {type(model.loss).__name__})")
        self.model, self.ctx, self.precision = model, ctx, precision
        ae_params = [p for m in (model.encoder, model.decoder, model.quant_conv, model.post_quant_conv)
                     for p in m.parameters()]
        if getattr(model, "learn_logvar", False):
            ae_params.append(model.loss.logvar)
        ae_params = trainable(ae_params)
        disc_params = trainable(model.loss.discriminator.parameters())
        self.disc_params = disc_params
        opt_ae = torch.optim.Adam(ae_params, lr=lr, betas=ADAM_BETAS)
        opt_disc = torch.optim.Adam(disc_params, lr=lr, betas=ADAM_BETAS)
        self.slots = [OptimizerSlot("ae", opt_ae, ae_params, precision.grad_scaler(), None, clip),
                      OptimizerSlot("disc", opt_disc, disc_params, precision.grad_scaler(), None, clip)]
        set_requires_grad(disc_params, False)  # the generator's DDP must not own the discriminator
        self.gen_step = wrap_ddp(_GeneratorStep(model), ctx)
        set_requires_grad(disc_params, True)
        self.disc_step = wrap_ddp(_DiscriminatorStep(model), ctx, broadcast_buffers=True)
        logger.info("training the autoencoder (%.2fM values) and the discriminator (%.2fM) with Adam, lr %.2e",
                    sum(p.numel() for p in ae_params) / 1e6, sum(p.numel() for p in disc_params) / 1e6, lr)

    @property
    def generators(self) -> dict[str, torch.Generator]:
        """No task-owned RNGs."""
        return {}

    def train(self) -> None:
        """Training mode (the LPIPS network stays in eval mode by itself)."""
        self.model.train()

    def train_step(self, batches: list[dict[str, Any]], step: int) -> dict[str, Any]:
        """Autoencoder step then discriminator step over the same micro-batches; returns the values to log."""
        inputs = [images_nchw(b, self.model.image_key, self.ctx.device) for b in batches]
        n, logs, recons = len(inputs), {}, []
        set_requires_grad(self.disc_params, False)
        for i, x in enumerate(inputs):
            with grad_sync(self.gen_step, i == n - 1):
                with self.precision.autocast():
                    loss, log, recon = self.gen_step(x, step)
                self.slots[0].backward(loss / n)
            recons.append(recon)
            _add(logs, log, n)
        logs.update(self.slots[0].step())
        set_requires_grad(self.disc_params, True)
        if self.model.loss.disc_factor > 0:  # disc_factor 0: the discriminator never learns, skip its step
            for i, (x, recon) in enumerate(zip(inputs, recons)):
                with grad_sync(self.disc_step, i == n - 1):
                    with self.precision.autocast():
                        d_loss, log = self.disc_step(x, recon, step)
                    self.slots[1].backward(d_loss / n)
                _add(logs, log, n)
            logs.update(self.slots[1].step())
            self._sync_discriminator_buffers()
        if getattr(self.model, "use_ema", False):
            self.model.model_ema(self.model)
        logs["lr_abs"] = self.slots[0].lr
        return logs

    @torch.no_grad()
    def _sync_discriminator_buffers(self) -> None:
        """Average the discriminator's BatchNorm statistics over ranks (each rank updated them on its own data)."""
        if not self.ctx.distributed:
            return
        for buf in self.model.loss.discriminator.buffers():
            if buf.is_floating_point():
                buf.copy_(all_reduce_mean(buf, self.ctx))

    @torch.no_grad()
    def validation_step(self, batch: dict[str, Any], step: int) -> dict[str, torch.Tensor]:
        """Validation losses of both parts (no adaptive weight: it needs gradients)."""
        x = images_nchw(batch, self.model.image_key, self.ctx.device)
        with self.precision.autocast():
            recon, posterior = self.model(x)
            _, logs = self.model.loss(x, recon, posterior, 0, step, last_layer=None, split="val")
            _, d_logs = self.model.loss(x, recon, posterior, 1, step, split="val")
        logs.update(d_logs)
        return {k: torch.as_tensor(v).detach().float() for k, v in logs.items()}

    def estimate_scale_factor(self, batch: dict[str, Any]) -> None:
        """Nothing to estimate for the autoencoder."""

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int, steps: int, guidance: float, eta: float) -> dict[str, Any]:
        """Inputs, reconstructions and decodings of random latents."""
        x = images_nchw(batch, self.model.image_key, self.ctx.device)[:n]
        with self.precision.autocast():
            recon, posterior = self.model(x)
            samples = self.model.decode(torch.randn_like(posterior.sample()))
        return {"rows": {"inputs": x, "reconstructions": recon.float(), "samples": samples.float()}, "captions": None}


def _add(logs: dict[str, Any], new: dict[str, Any], n: int) -> None:
    for k, v in new.items():
        logs[k] = logs.get(k, 0.0) + torch.as_tensor(v).detach().float() / n

"""Loss of the KL autoencoder: L1 (+ LPIPS) reconstruction, KL, and a PatchGAN with the adaptive weight."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.losses.discriminator import NLayerDiscriminator, weights_init
from ldm.modules.losses.lpips import LPIPS

logger = logging.getLogger(__name__)


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """``weight`` from step ``threshold`` on, ``value`` before."""
    return value if global_step < threshold else weight


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (scalar)."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating (softplus) discriminator loss (scalar)."""
    return 0.5 * (torch.mean(F.softplus(-logits_real)) + torch.mean(F.softplus(logits_fake)))


def _existing(paths: str | os.PathLike | Sequence | None) -> list[str] | None:
    if paths is None:
        return None
    items = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    return [str(p) for p in items] if items and all(Path(p).expanduser().is_file() for p in items) else None


class LPIPSWithDiscriminator(nn.Module):
    """``forward(inputs, reconstructions, posteriors, optimizer_idx, global_step, last_layer)`` -> (loss, log).

    ``optimizer_idx`` 0: autoencoder loss ``nll + kl_weight * kl + d_weight * disc_factor * g_loss``, where
    ``d_weight = |grad nll| / (|grad g_loss| + 1e-4)`` at the decoder's last layer (clamped to [0, 1e4], times
    ``disc_weight``); 1: the discriminator's loss. The disc terms start at ``disc_start``.
    ``perceptual_weights``: local LPIPS weight file(s) (see :mod:`ldm.modules.losses.lpips`); without them the
    perceptual term is left out, with a notice. Images are [B, C, H, W] in [-1, 1].
    """

    def __init__(self, disc_start: int, logvar_init: float = 0.0, kl_weight: float = 1.0,
                 pixelloss_weight: float = 1.0, disc_num_layers: int = 3, disc_in_channels: int = 3,
                 disc_factor: float = 1.0, disc_weight: float = 1.0, perceptual_weight: float = 1.0,
                 use_actnorm: bool = False, disc_conditional: bool = False, disc_loss: str = "hinge",
                 perceptual_weights: str | Sequence[str] | None = None, disc_ndf: int = 64) -> None:
        super().__init__()
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got '{disc_loss}'")
        self.kl_weight = kl_weight
        self.pixel_weight = pixelloss_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = self._build_lpips(perceptual_weights) if perceptual_weight > 0 else None
        self.logvar = nn.Parameter(torch.ones(size=()) * logvar_init)
        self.discriminator = NLayerDiscriminator(input_nc=disc_in_channels, ndf=disc_ndf, n_layers=disc_num_layers,
                                                 use_actnorm=use_actnorm).apply(weights_init)
        self.discriminator_iter_start = disc_start
        self.disc_loss = hinge_d_loss if disc_loss == "hinge" else vanilla_d_loss
        self.disc_factor = disc_factor
        self.discriminator_weight = disc_weight
        self.disc_conditional = disc_conditional

    @staticmethod
    def _build_lpips(paths: str | Sequence[str] | None) -> LPIPS | None:
        found = _existing(paths)
        if found is None:
            where = f"the file(s) {paths} do not exist" if paths else "no perceptual_weights were given"
            logger.warning("LPIPS perceptual loss OFF: %s. Training continues with L1 + KL + GAN only. To enable "
                           "it, set model.params.lossconfig.params.perceptual_weights to local LPIPS weights "
                           "(vgg.pth heads + torchvision vgg16 weights, or one merged file).", where)
            return None
        logger.info("LPIPS perceptual loss from %s", found)
        return LPIPS(found)

    def calculate_adaptive_weight(self, nll_loss: torch.Tensor, g_loss: torch.Tensor,
                                  last_layer: torch.Tensor) -> torch.Tensor:
        """Ratio of the gradient norms of the NLL and GAN losses at ``last_layer`` (detached scalar)."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        return torch.clamp(d_weight, 0.0, 1e4).detach() * self.discriminator_weight

    def reconstruction_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Per-pixel L1 plus the weighted LPIPS distance (when available): [B, C, H, W]."""
        rec = torch.abs(inputs.contiguous() - reconstructions.contiguous())
        if self.perceptual_loss is not None:
            p = self.perceptual_loss(inputs.contiguous().float(), reconstructions.contiguous().float())
            rec = rec + self.perceptual_weight * p
        return rec

    def _logits(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if cond is None:
            if self.disc_conditional:
                raise ValueError("disc_conditional=True needs cond")
            return self.discriminator(x.contiguous())
        if not self.disc_conditional:
            raise ValueError("cond given but disc_conditional=False")
        return self.discriminator(torch.cat((x.contiguous(), cond), dim=1))

    def generator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors: Any,
                       global_step: int, last_layer: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                       split: str = "train", weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """Autoencoder loss (optimizer 0) and its log."""
        rec_loss = self.reconstruction_loss(inputs, reconstructions)
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted = nll_loss if weights is None else weights * nll_loss
        weighted_nll = torch.sum(weighted) / weighted.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl = posteriors.kl()
        kl_loss = torch.sum(kl) / kl.shape[0]
        g_loss = -torch.mean(self._logits(reconstructions, cond))
        d_weight = torch.tensor(0.0, device=inputs.device)
        if self.disc_factor > 0.0 and last_layer is not None:
            try:
                d_weight = self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
            except RuntimeError:
                if self.training:
                    raise
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        loss = weighted_nll + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {f"{split}/total_loss": loss.detach(), f"{split}/logvar": self.logvar.detach(),
               f"{split}/kl_loss": kl_loss.detach(), f"{split}/nll_loss": nll_loss.detach(),
               f"{split}/rec_loss": rec_loss.detach().mean(), f"{split}/d_weight": d_weight.detach(),
               f"{split}/disc_factor": torch.tensor(disc_factor), f"{split}/g_loss": g_loss.detach()}
        return loss, log

    def discriminator_loss(self, inputs: torch.Tensor, reconstructions: torch.Tensor, global_step: int,
                           cond: torch.Tensor | None = None, split: str = "train") -> tuple[torch.Tensor, dict]:
        """Discriminator loss (optimizer 1) on detached inputs/reconstructions, and its log."""
        logits_real = self._logits(inputs.detach(), cond)
        logits_fake = self._logits(reconstructions.detach(), cond)
        disc_factor = adopt_weight(self.disc_factor, global_step, threshold=self.discriminator_iter_start)
        d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
        log = {f"{split}/disc_loss": d_loss.detach(), f"{split}/logits_real": logits_real.detach().mean(),
               f"{split}/logits_fake": logits_fake.detach().mean()}
        return d_loss, log

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor, posteriors: Any, optimizer_idx: int,
                global_step: int, last_layer: torch.Tensor | None = None, cond: torch.Tensor | None = None,
                split: str = "train", weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
        """The original entry point: dispatch on ``optimizer_idx`` (0 autoencoder, 1 discriminator)."""
        if optimizer_idx == 0:
            return self.generator_loss(inputs, reconstructions, posteriors, global_step, last_layer, cond, split,
                                       weights)
        if optimizer_idx == 1:
            return self.discriminator_loss(inputs, reconstructions, global_step, cond, split)
        raise ValueError(f"optimizer_idx must be 0 or 1, got {optimizer_idx}")

"""Latents cached once, so that the diffusion model trains without running the encoder at every step.

``encode_to_cache`` stores the encoder's posterior moments (mean and log-variance, [N, 2*z, h, w]) of a data set
with the captions. For training, ``CachedMoments`` serves them in the place of pictures, and
``MomentsAutoencoderKL`` (a plain ``AutoencoderKL`` with the same weights and keys) turns them back into the
posterior that ``LatentDiffusion`` samples from: the training maths is exactly that of encoding on the fly.
The inference config names the plain ``AutoencoderKL``.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution

logger = logging.getLogger(__name__)


class MomentsAutoencoderKL(AutoencoderKL):
    """``AutoencoderKL`` whose ``encode`` takes cached posterior moments [B, 2*embed_dim, h, w], not pictures."""

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Posterior from cached moments [B, 2*embed_dim, h, w] (mean, log-variance)."""
        if x.shape[1] != 2 * self.embed_dim:
            raise ValueError(f"MomentsAutoencoderKL.encode expects cached moments with {2 * self.embed_dim} channels, "
                             f"got {x.shape[1]}: use ldm.default_model.latents.CachedMoments as the data set, "
                             "or ldm.models.autoencoder.AutoencoderKL for pictures")
        return DiagonalGaussianDistribution(x)


@torch.no_grad()
def encode_to_cache(autoencoder: AutoencoderKL, dataset: Dataset, out: str | Path, batch_size: int = 16,
                    image_key: str = "jpg", caption_key: str = "txt", device: str | torch.device = "cpu") -> Path:
    """Encode every picture of ``dataset`` and write ``out`` (.safetensors: ``moments`` [N, 2z, h, w] float32)
    plus ``out.json`` with the captions. Returns ``out``."""
    autoencoder = autoencoder.to(device).eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    moments, captions, start = [], [], time.time()
    for batch in loader:
        x = batch[image_key].permute(0, 3, 1, 2).to(device).float()
        h = autoencoder.quant_conv(autoencoder.encoder(x))
        moments.append(h.float().cpu())
        captions.extend(batch[caption_key])
        if len(captions) % (batch_size * 20) == 0:
            logger.info("encoded %d/%d pictures (%.0f s)", len(captions), len(dataset), time.time() - start)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"moments": torch.cat(moments).contiguous()}, str(out))
    out.with_suffix(".json").write_text(json.dumps({"captions": captions}), encoding="utf-8")
    logger.info("cached the latents of %d pictures in %s (%.0f s)", len(captions), out, time.time() - start)
    return out


def latent_std(path: str | Path, samples: int = 4096, seed: int = 0) -> float:
    """Standard deviation of posterior samples of a cache (for ``scale_factor = 1 / std``)."""
    moments = load_file(str(path))["moments"]
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(moments.shape[0], generator=gen)[:samples]
    mean, logvar = moments[idx].double().chunk(2, dim=1)
    z = mean + torch.exp(0.5 * logvar.clamp(-30, 20)) * torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
    return float(z.std())


class CachedMoments(Dataset):
    """Cached moments as a data set: item ``i`` is ``{image_key: [h, w, 2z] float, caption_key: str}``.

    The channels-last layout is the one of picture batches, so ``LatentDiffusion.get_input`` handles it as is.
    """

    def __init__(self, path: str, image_key: str = "jpg", caption_key: str = "txt") -> None:
        path_ = Path(path)
        if not path_.is_file() or not path_.with_suffix(".json").is_file():
            raise FileNotFoundError(f"latent cache '{path_}' (and its .json) not found: make it with "
                                    "scripts/train_default_model.py (or ldm.default_model.latents.encode_to_cache)")
        self.moments = load_file(str(path_))["moments"].permute(0, 2, 3, 1).contiguous()
        self.captions = json.loads(path_.with_suffix(".json").read_text(encoding="utf-8"))["captions"]
        if len(self.captions) != self.moments.shape[0]:
            raise ValueError(f"latent cache '{path_}': {self.moments.shape[0]} latents but {len(self.captions)} "
                             "captions")
        self.image_key, self.caption_key = image_key, caption_key

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index = item[0] if isinstance(item, tuple) else item
        return {self.image_key: self.moments[index], self.caption_key: self.captions[index]}


def captions_of(dataset: Iterable[dict[str, Any]], caption_key: str = "txt") -> list[str]:
    """The captions of a data set, in order."""
    return [item[caption_key] for item in dataset]

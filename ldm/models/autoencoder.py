"""The KL-regularised autoencoder (``AutoencoderKL``), the first stage of Stable Diffusion."""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.tiling import check_tiling, tiled_apply
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class AutoencoderKL(nn.Module):
    """Image [B, 3, H, W] in [-1, 1] <-> latent [B, embed_dim, H/f, W/f] through a diagonal Gaussian posterior.

    Constructor arguments and state_dict keys (encoder, decoder, quant_conv, post_quant_conv, loss) are the
    original's. Training lives elsewhere: it uses ``encode``, ``decode``, ``forward``, ``get_last_layer``
    and ``self.loss`` (``torch.nn.Identity`` in the inference configs).

    Low memory: :meth:`enable_tiling` (or ``tile_size=`` on ``encode``/``decode``) processes big inputs in
    overlapping, blended latent tiles (see :mod:`ldm.modules.diffusionmodules.tiling` for the approximation).
    """

    tile_size: int | None = None  # latent cells per tile side; None = whole inputs (the original behaviour)
    tile_overlap: int | None = None  # latent cells shared by neighbouring tiles; None = tile_size // 4

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: int,
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 colorize_nlabels: int | None = None, monitor: str | None = None, ema_decay: float | None = None,
                 learn_logvar: bool = False) -> None:
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z = True (the encoder outputs mean and logvar)")
        self.learn_logvar = learn_logvar
        self.image_key = image_key
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.loss = instantiate_from_config(lossconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if colorize_nlabels is not None:
            if not isinstance(colorize_nlabels, int):
                raise TypeError(f"colorize_nlabels must be an int, got {colorize_nlabels!r}")
            self.register_buffer("colorize", torch.randn(3, colorize_nlabels, 1, 1))
        if monitor is not None:
            self.monitor = monitor
        self.use_ema = ema_decay is not None
        if self.use_ema:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
            from ldm.modules.ema import LitEma  # imported only when EMA is asked for

            self.ema_decay = ema_decay
            self.model_ema = LitEma(self, decay=ema_decay)
            logger.info("Keeping EMAs of %d.", len(list(self.model_ema.buffers())))
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=list(ignore_keys))

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        """Load weights from a .ckpt/.safetensors file (an autoencoder or a full SD checkpoint).

        Keys starting with any of ``ignore_keys`` are dropped (and may be missing); a full checkpoint's
        ``first_stage_model.`` prefix is stripped and its other parts left aside. Training-loss weights (``loss.*``)
        may be absent or unused; any other mismatch is one :class:`ldm.checkpoint.CheckpointError` naming the file.
        """
        from ldm.checkpoint import drop_ignored_keys, load_config_checkpoint, load_state_dict_file

        sd = dict(load_state_dict_file(path))
        own = set(self.state_dict())
        prefix = "first_stage_model."
        if not own & set(sd) and any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        drop_ignored_keys(sd, ignore_keys)
        load_config_checkpoint(self, sd, path, ignore_keys, allow_unexpected=("loss.",),
                               hint="If the file lacks the autoencoder's weights, it is not an autoencoder (or full "
                                    "Stable Diffusion) checkpoint")

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap in the EMA weights (no-op without EMA)."""
        if not self.use_ema:
            yield
            return
        self.model_ema.store(self.parameters())
        self.model_ema.copy_to(self)
        if context is not None:
            logger.info("%s: Switched to EMA weights", context)
        try:
            yield
        finally:
            self.model_ema.restore(self.parameters())
            if context is not None:
                logger.info("%s: Restored training weights", context)

    @property
    def factor(self) -> int:
        """Downsampling factor f between image pixels and latent cells."""
        return 2 ** (self.encoder.num_resolutions - 1)

    def enable_tiling(self, tile_size: int = 64, overlap: int | None = None) -> None:
        """Encode/decode in tiles of ``tile_size`` latent cells overlapping by ``overlap`` (default a quarter)."""
        check_tiling(tile_size, tile_size // 4 if overlap is None else overlap)
        self.tile_size, self.tile_overlap = tile_size, overlap

    def disable_tiling(self) -> None:
        """Encode/decode whole inputs again (the default)."""
        self.tile_size = self.tile_overlap = None

    def _tiling(self, tile_size: int | None, overlap: int | None) -> tuple[int | None, int]:
        """(tile, overlap) in latent cells: the arguments, else the ``enable_tiling`` settings; tile None = off."""
        if tile_size is None:
            tile_size, overlap = self.tile_size, self.tile_overlap if overlap is None else overlap
        if tile_size is None:
            return None, 0
        return tile_size, tile_size // 4 if overlap is None else overlap

    def _moments(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def _image(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def encode(self, x: torch.Tensor, tile_size: int | None = None,
               tile_overlap: int | None = None) -> DiagonalGaussianDistribution:
        """Image [B, 3, H, W] -> posterior over latents [B, embed_dim, H/f, W/f] (in tiles when asked)."""
        tile, overlap = self._tiling(tile_size, tile_overlap)
        if tile is None:
            return DiagonalGaussianDistribution(self._moments(x))
        return DiagonalGaussianDistribution(tiled_apply(self._moments, x, tile, overlap, in_scale=self.factor))

    def decode(self, z: torch.Tensor, tile_size: int | None = None, tile_overlap: int | None = None) -> torch.Tensor:
        """Latent [B, embed_dim, h, w] -> image [B, 3, h*f, w*f] (in tiles when asked)."""
        tile, overlap = self._tiling(tile_size, tile_overlap)
        if tile is None:
            return self._image(z)
        return tiled_apply(self._image, z, tile, overlap, out_scale=self.factor)

    def forward(self, input: torch.Tensor, sample_posterior: bool = True  # noqa: A002 (original name)
                ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct ``input`` through a posterior sample (or its mode): returns (reconstruction, posterior)."""
        posterior = self.encode(input)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """``batch[k]`` as NHWC (or NHW) -> contiguous float NCHW."""
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def get_last_layer(self) -> torch.Tensor:
        """The decoder's last conv weight (for the adaptive GAN loss weight)."""
        return self.decoder.conv_out.weight

    @torch.no_grad()
    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """Map a segmentation-like [B, n, H, W] to RGB in [-1, 1] with a fixed random projection."""
        if not hasattr(self, "colorize"):
            self.register_buffer("colorize", torch.randn(3, x.shape[1], 1, 1).to(x))
        x = F.conv2d(x, weight=self.colorize)
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

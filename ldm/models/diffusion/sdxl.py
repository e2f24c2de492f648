"""SDXL's model container (``sgm``'s ``DiffusionEngine``) with the original's attribute names and state_dict keys.

``DiffusionEngine`` holds ``model`` (an :class:`OpenAIWrapper` around the UNet: ``model.diffusion_model.*``),
``denoiser`` (``denoiser.sigmas``), ``conditioner`` (``conditioner.embedders.N.*``) and ``first_stage_model``
(the KL autoencoder). Sampling is not part of it: samplers call ``denoiser(model, x, sigma, cond)``.
"""
from __future__ import annotations

import importlib.util
import logging
from contextlib import nullcontext
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.models.autoencoder import AutoencoderKL as _AutoencoderKL
from ldm.models.diffusion.wrapper import freeze
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

OPENAI_WRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"
EMPTY_CONDITIONER = {"target": "ldm.modules.encoders.sdxl_conditioner.GeneralConditioner",
                     "params": {"emb_models": []}}
TRAINING_ONLY = ("sampler_config", "optimizer_config", "scheduler_config", "loss_fn_config")


class OpenAIWrapper(nn.Module):
    """``model(x, t, cond)`` -> ``diffusion_model(cat([x, cond["concat"]]), t, context=cond["crossattn"],
    y=cond["vector"])``; the UNet's keys start with ``diffusion_model.``."""

    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False) -> None:
        super().__init__()
        self.diffusion_model = torch.compile(diffusion_model) if compile_model else diffusion_model

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: Mapping[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """Network output [B, C_out, H, W] for x [B, C, H, W], timesteps t [B] and the conditioning dict ``c``."""
        if c.get("concat") is not None:
            x = torch.cat((x, c["concat"].to(x)), dim=1)
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)


class SGMAutoencoderKL(_AutoencoderKL):
    """The SDXL VAE (``sgm.models.autoencoder.AutoencoderKL``): the SD autoencoder under sgm's constructor arguments.

    ``attn_type: vanilla-xformers`` is the same maths as ``vanilla``; without xformers installed it builds
    ``vanilla``. sgm's training-only arguments (regularizer, loss, monitor, ...) are accepted and unused.
    """

    def __init__(self, embed_dim: int, ddconfig: Mapping[str, Any], lossconfig: Optional[Mapping[str, Any]] = None,
                 loss_config: Optional[Mapping[str, Any]] = None, ckpt_path: Optional[str] = None,
                 ignore_keys: Sequence[str] = (), monitor: Optional[str] = None,
                 max_batch_size: Optional[int] = None, **unused: Any) -> None:
        ddconfig = dict(ddconfig)
        if ddconfig.get("attn_type") == "vanilla-xformers" and importlib.util.find_spec("xformers") is None:
            ddconfig["attn_type"] = "vanilla"
        if unused:
            logger.debug("SGMAutoencoderKL: training-only arguments %s unused", sorted(unused))
        loss = lossconfig if lossconfig is not None else loss_config
        super().__init__(ddconfig, loss if loss is not None else {"target": "torch.nn.Identity"}, embed_dim,
                         ckpt_path=ckpt_path, ignore_keys=ignore_keys, monitor=monitor)
        self.max_batch_size = max_batch_size


class DiffusionEngine(nn.Module):
    """SDXL base / refiner: UNet wrapper, discrete denoiser, conditioner and KL autoencoder (inference parts).

    Constructor arguments are sgm's; the training-only ones (sampler, optimizer, scheduler, loss) are accepted and
    not built. ``scale_factor`` (0.13025 for SDXL) multiplies latents after encoding and divides them before decoding.
    """

    def __init__(self, network_config: Mapping[str, Any], denoiser_config: Mapping[str, Any],
                 first_stage_config: Mapping[str, Any], conditioner_config: Optional[Mapping[str, Any]] = None,
                 network_wrapper: Optional[str] = None, ckpt_path: Optional[str] = None, use_ema: bool = False,
                 ema_decay_rate: float = 0.9999, scale_factor: float = 1.0, disable_first_stage_autocast: bool = False,
                 input_key: str = "jpg", compile_model: bool = False,
                 en_and_decode_n_samples_a_time: Optional[int] = None, **training_only: Any) -> None:
        super().__init__()
        unknown = sorted(set(training_only) - set(TRAINING_ONLY) - {"log_keys", "no_cond_log"})
        if unknown:
            raise TypeError(f"DiffusionEngine got unexpected arguments {unknown}")
        if network_wrapper not in (None, OPENAI_WRAPPER, f"{__name__}.OpenAIWrapper"):
            raise ValueError(f"network_wrapper '{network_wrapper}' is not supported; SDXL uses {OPENAI_WRAPPER}")
        self.input_key = input_key
        self.model = OpenAIWrapper(instantiate_from_config(network_config), compile_model=compile_model)
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(conditioner_config or EMPTY_CONDITIONER)
        self.first_stage_model = freeze(instantiate_from_config(first_stage_config))
        self.use_ema = use_ema
        if use_ema:
            from ldm.modules.ema import LitEma  # only for training configs

            self.model_ema = LitEma(self.model, decay=ema_decay_rate)
        self.scale_factor = scale_factor
        self.disable_first_stage_autocast = disable_first_stage_autocast
        self.en_and_decode_n_samples_a_time = en_and_decode_n_samples_a_time
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path)

    def init_from_ckpt(self, path: str) -> None:
        """Load a full SDXL checkpoint (.safetensors / .ckpt) strictly; mismatches are one readable error."""
        from ldm.checkpoint import load_config_checkpoint, load_state_dict_file

        load_config_checkpoint(self, dict(load_state_dict_file(path)), path,
                               hint="If it is not an SDXL checkpoint of this config's kind, use its own config")

    def _chunks(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``x`` in the autoencoder's dtype, split into batches of at most ``en_and_decode_n_samples_a_time`` rows."""
        x = x.to(self.first_stage_model.post_quant_conv.weight.dtype)
        n = self.en_and_decode_n_samples_a_time or x.shape[0]
        return list(x.split(max(int(n), 1)))

    def _autocast(self, x: torch.Tensor) -> Any:
        """Autocast switched off around the autoencoder when ``disable_first_stage_autocast`` (as the original)."""
        return torch.autocast(x.device.type, enabled=False) if self.disable_first_stage_autocast else nullcontext()

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        """Latents [B, 4, h, w] -> images [B, 3, h*f, w*f] in [-1, 1] (``decode(z / scale_factor)``)."""
        z = z / self.scale_factor
        with self._autocast(z):
            return torch.cat([self.first_stage_model.decode(part) for part in self._chunks(z)], dim=0)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor, sample: bool = True,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents [B, 4, H/f, W/f] times ``scale_factor``: a posterior sample
        as the original (``sample=False``: its mean)."""
        with self._autocast(x):
            parts = [self.first_stage_model.encode(part) for part in self._chunks(x)]
        z = torch.cat([p.sample(generator) if sample else p.mode() for p in parts], dim=0)
        return self.scale_factor * z

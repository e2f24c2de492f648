"""Gaussian diffusion models with the original constructor arguments and checkpoint layout.

``DDPM``: the diffusion process in pixel space around a network (``model.diffusion_model``), its schedule buffers,
the training loss (see :mod:`~ldm.models.diffusion.objective`, incl. Improved DDPM's learned variance and hybrid
loss) and EMA weights, optionally conditioned by a ``cond_stage_model`` (e.g. a class embedder).
``LatentDiffusion``: the same in the latent space of a frozen autoencoder (``first_stage_model``). Sampling lives
in the samplers (:mod:`ldm.models.diffusion.ddim`, ``plms``, ``dpm_solver``, ``ancestral``), which see these
models through ``apply_model``.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ldm.models.diffusion.objective import DiffusionObjective, check_objective
from ldm.models.diffusion.parameterization import Prediction
from ldm.models.diffusion.process import DiffusionProcess
from ldm.models.diffusion.training import conditioning_dropout, load_checkpoint_into, make_optimizer
from ldm.models.diffusion.variance import VarianceType, check_output_channels
from ldm.models.diffusion.wrapper import DiffusionWrapper, disabled_train, freeze  # noqa: F401 (original names)
from ldm.modules.diffusionmodules.schedules import (DDPM_BUFFER_NAMES, ddpm_schedule, lvlb_weights,
                                                    make_beta_schedule, min_snr_weights)
from ldm.modules.ema import LitEma
from ldm.util import count_params, default, instantiate_from_config

logger = logging.getLogger(__name__)

__conditioning_keys__ = {"concat": "c_concat", "crossattn": "c_crossattn", "adm": "y"}


class DDPM(DiffusionProcess, DiffusionObjective, nn.Module):
    """Denoising diffusion (Ho et al. 2020) around the network of ``unet_config``; the original arguments.

    Additions (defaults = the original behaviour): ``model_var_type`` (fixed_small | fixed_large | learned |
    learned_range; learned ones need 2C network outputs), ``loss_type`` hybrid / vlb with ``lambda_vlb``, and
    for pixel-space conditioning ``cond_stage_config`` / ``cond_stage_key`` / ``cond_stage_trainable``
    (e.g. a ``ClassEmbedder`` routed by ``conditioning_key: crossattn``).
    """

    def __init__(self, unet_config: Mapping[str, Any], timesteps: int = 1000, beta_schedule: str = "linear",
                 loss_type: str = "l2", ckpt_path: str | None = None, ignore_keys: Sequence[str] = (),
                 load_only_unet: bool = False, monitor: str | None = "val/loss", use_ema: bool = True,
                 first_stage_key: str = "image", image_size: int = 256, channels: int = 3, log_every_t: int = 100,
                 clip_denoised: bool = True, linear_start: float = 1e-4, linear_end: float = 2e-2,
                 cosine_s: float = 8e-3, given_betas: Sequence[float] | None = None,
                 original_elbo_weight: float = 0.0, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 conditioning_key: str | None = None, parameterization: str = "eps",
                 scheduler_config: Mapping[str, Any] | None = None, use_positional_encodings: bool = False,
                 learn_logvar: bool = False, logvar_init: float = 0.0, make_it_fit: bool = False,
                 ucg_training: Mapping[str, Mapping[str, Any]] | None = None, reset_ema: bool = False,
                 reset_num_ema_updates: bool = False, model_var_type: str = "fixed_small", lambda_vlb: float = 1e-3,
                 cond_stage_config: Mapping[str, Any] | str | None = None, cond_stage_key: str | None = None,
                 cond_stage_trainable: bool = False, snr_gamma: float | None = None, **unknown: Any) -> None:
        super().__init__()
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown constructor argument(s) {sorted(unknown)}; "
                            f"remove them from the config's params or check their spelling")
        self.model_var_type = VarianceType.parse(model_var_type)
        check_objective(loss_type, self.model_var_type)
        self.lambda_vlb = float(lambda_vlb)
        self.prediction = Prediction.parse(parameterization)
        self.parameterization = self.prediction.value
        logger.info("%s: running in %s-prediction mode", type(self).__name__, self.parameterization)
        self.cond_stage_model = None
        self.first_stage_model = None  # pixel space: no autoencoder (LatentDiffusion sets its own)
        self.cond_stage_key, self.cond_stage_trainable = cond_stage_key, cond_stage_trainable
        self.cond_stage_forward: str | None = None
        self.clip_denoised, self.log_every_t = clip_denoised, log_every_t
        self.first_stage_key, self.image_size, self.channels = first_stage_key, image_size, channels
        self.use_positional_encodings = use_positional_encodings
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        check_output_channels(unet_config, channels, self.model_var_type)
        logger.info("%s has %.2f M params.", type(self.model.diffusion_model).__name__, count_params(self.model) * 1e-6)
        self.use_ema = use_ema
        if self.use_ema:
            self.model_ema = LitEma(self.model)
        self.use_scheduler = scheduler_config is not None
        self.scheduler_config = scheduler_config
        self.v_posterior, self.original_elbo_weight = v_posterior, original_elbo_weight
        self.l_simple_weight, self.loss_type = l_simple_weight, loss_type
        self.snr_gamma = None if snr_gamma is None else float(snr_gamma)
        if monitor is not None:
            self.monitor = monitor
        self.make_it_fit = make_it_fit
        self.register_schedule(given_betas=given_betas, beta_schedule=beta_schedule, timesteps=timesteps,
                               linear_start=linear_start, linear_end=linear_end, cosine_s=cosine_s)
        self.learn_logvar = learn_logvar
        logvar = torch.full((self.num_timesteps,), float(logvar_init))
        self.logvar = nn.Parameter(logvar, requires_grad=True) if learn_logvar else logvar
        self.ucg_training = dict(ucg_training or {})
        self.ucg_prng = np.random.RandomState()
        if cond_stage_config is not None:
            if conditioning_key is None or cond_stage_key is None:
                raise ValueError("a cond_stage_config needs conditioning_key (e.g. crossattn) and cond_stage_key "
                                 "(the batch entry it encodes, e.g. class_label)")
            self.instantiate_cond_stage(cond_stage_config)
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys=ignore_keys, only_model=load_only_unet)
        self._after_checkpoint(ckpt_path, reset_ema, reset_num_ema_updates)

    def _after_checkpoint(self, ckpt_path: str | None, reset_ema: bool, reset_num_ema_updates: bool) -> None:
        if reset_ema:
            if ckpt_path is None or not self.use_ema:
                raise ValueError("reset_ema needs ckpt_path and use_ema=True")
            logger.info("Resetting EMA to the model weights (useful when restoring from an EMA-only checkpoint)")
            self.model_ema = LitEma(self.model)
        if reset_num_ema_updates:
            if not self.use_ema:
                raise ValueError("reset_num_ema_updates needs use_ema=True")
            logger.warning("Resetting the number of EMA updates to zero")
            self.model_ema.reset_num_updates()

    @property
    def device(self) -> torch.device:
        """Device of the model's buffers and parameters."""
        return self.betas.device

    def register_schedule(self, given_betas: Sequence[float] | None = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3) -> None:
        """Compute the schedule in float64 and register the 12 float32 buffers (+ non-persistent lvlb_weights)."""
        if given_betas is not None:
            betas = np.asarray(given_betas, dtype=np.float64)
        else:
            betas = make_beta_schedule(beta_schedule, timesteps, linear_start=linear_start, linear_end=linear_end,
                                       cosine_s=cosine_s)
        schedule = ddpm_schedule(betas, self.v_posterior)
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        device = self.betas.device if hasattr(self, "betas") else None
        for name in DDPM_BUFFER_NAMES:
            self.register_buffer(name, torch.tensor(schedule[name], dtype=torch.float32, device=device))
        weights = lvlb_weights(schedule, self.parameterization)  # computed on the CPU (also when building on meta)
        if torch.isnan(weights).all():
            raise ValueError("the variational-bound weights are all NaN: check the beta schedule")
        self.register_buffer("lvlb_weights", weights.to(device), persistent=False)
        if self.snr_gamma is not None:
            snr_weights = min_snr_weights(torch.tensor(schedule["alphas_cumprod"], dtype=torch.float32),
                                          self.parameterization, self.snr_gamma)
            self.register_buffer("snr_weights", snr_weights.to(device), persistent=False)

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Within the block the network holds its EMA weights; the training weights are restored after."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Load a .ckpt/.safetensors file safely; only ``ignore_keys`` and the original's leniency may differ."""
        load_checkpoint_into(self.model if only_model else self, path, ignore_keys, self.make_it_fit)

    def instantiate_cond_stage(self, config: Mapping[str, Any] | str) -> None:
        """Build the conditioning model (frozen unless cond_stage_trainable); special strings as the original."""
        if self.cond_stage_trainable:
            if config in ("__is_first_stage__", "__is_unconditional__"):
                raise ValueError(f"cond_stage_trainable cannot be used with cond_stage_config '{config}'")
            self.cond_stage_model = instantiate_from_config(config)
        elif config == "__is_first_stage__":
            if self.first_stage_model is None:
                raise ValueError("cond_stage_config '__is_first_stage__' needs a first stage (LatentDiffusion)")
            logger.info("Using the first stage also as cond stage.")
            self.cond_stage_model = self.first_stage_model
        elif config == "__is_unconditional__":
            logger.info("Training %s as an unconditional model.", type(self).__name__)
            self.cond_stage_model = None
        else:
            self.cond_stage_model = freeze(instantiate_from_config(config))

    def get_learned_conditioning(self, c: Any) -> Any:
        """Conditioning of the cond stage model for raw inputs ``c`` (prompts -> [B, 77, D]; a batch -> [B, 1, D])."""
        if self.cond_stage_forward is not None:
            return getattr(self.cond_stage_model, self.cond_stage_forward)(c)
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c.mode() if not torch.is_tensor(c) and callable(getattr(c, "mode", None)) else c
        return self.cond_stage_model(c)

    def get_raw_conditioning(self, batch: Mapping[str, Any], cond_key: str, x: torch.Tensor | None = None) -> Any:
        """What the cond stage encodes for ``batch``: the images, captions, the whole batch (class labels), ..."""
        if cond_key == self.first_stage_key and x is not None:
            return x
        if cond_key in ("caption", "coordinates_bbox", "txt"):
            return batch[cond_key]
        if cond_key in ("class_label", "cls"):
            return batch
        return DDPM.get_input(self, batch, cond_key).to(self.device)

    # -- training
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any = None,
                    return_ids: bool = False) -> torch.Tensor:
        """Raw network output [B, ...]; ``cond`` is a tensor, a list, or a dict of ``c_concat``/``c_crossattn``/..."""
        if not isinstance(cond, dict):
            key = "c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"
            cond = {key: cond if isinstance(cond, list) else [cond]}
        out = self.model(x_noisy, t, **cond)
        return out[0] if isinstance(out, tuple) and not return_ids else out

    def forward(self, x: torch.Tensor, c: Any = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss at uniformly random timesteps for x [B, ...] (conditioning c encoded when trainable)."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()
        if c is not None and self.cond_stage_trainable:
            c = self.get_learned_conditioning(c)
        return self.p_losses(x, c, t, *args, **kwargs)

    def get_input(self, batch: Mapping[str, Any], k: str) -> torch.Tensor:
        """Batch entry ``k`` as a contiguous float [B, C, H, W] tensor (batches store images as [B, H, W, C])."""
        x = batch[k]
        if x.dim() == 3:
            x = x[..., None]
        return x.permute(0, 3, 1, 2).to(memory_format=torch.contiguous_format).float()

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, loss_dict) of a data batch; conditioning dropout is applied in training mode."""
        if self.training and self.ucg_training:
            batch = conditioning_dropout(batch, self.ucg_training, self.ucg_prng)
        x = self.get_input(batch, self.first_stage_key)
        if self.cond_stage_model is None or self.model.conditioning_key is None:
            return self(x)
        c = self.get_raw_conditioning(batch, self.cond_stage_key, x)
        return self(x, c if self.cond_stage_trainable else self.get_learned_conditioning(c))

    def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
        """After an optimizer step: update the EMA weights."""
        if self.use_ema:
            self.model_ema(self.model)

    def configure_optimizers(self) -> Any:
        """AdamW over the trainable weights at ``self.learning_rate`` (+ the LambdaLR of scheduler_config)."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        if getattr(self, "cond_stage_trainable", False) and self.cond_stage_model is not None:
            params += [p for p in self.cond_stage_model.parameters() if p.requires_grad]
        if self.learn_logvar:
            params.append(self.logvar)
        return make_optimizer(params, self.learning_rate, self.scheduler_config)


class LatentDiffusion(DDPM):
    """Diffusion in the latent space of a frozen ``first_stage_model``, conditioned by ``cond_stage_model``."""

    def __init__(self, first_stage_config: Mapping[str, Any], cond_stage_config: Mapping[str, Any] | str,
                 num_timesteps_cond: int | None = None, cond_stage_key: str = "image",
                 cond_stage_trainable: bool = False, concat_mode: bool = True, cond_stage_forward: str | None = None,
                 conditioning_key: str | None = None, scale_factor: float = 1.0, scale_by_std: bool = False,
                 force_null_conditioning: bool = False, *args: Any, **kwargs: Any) -> None:
        self.force_null_conditioning = force_null_conditioning
        self.num_timesteps_cond = default(num_timesteps_cond, 1)
        self.scale_by_std = scale_by_std
        if self.num_timesteps_cond > kwargs.get("timesteps", 1000):
            raise ValueError("num_timesteps_cond cannot exceed timesteps")
        if conditioning_key is None:  # backwards compatibility, as the original
            conditioning_key = "concat" if concat_mode else "crossattn"
        if cond_stage_config == "__is_unconditional__" and not force_null_conditioning:
            conditioning_key = None
        ckpt_path = kwargs.pop("ckpt_path", None)
        reset_ema = kwargs.pop("reset_ema", False)
        reset_num_ema_updates = kwargs.pop("reset_num_ema_updates", False)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, conditioning_key=conditioning_key, **kwargs)
        self.concat_mode, self.cond_stage_key = concat_mode, cond_stage_key
        self.cond_stage_trainable = cond_stage_trainable
        try:
            self.num_downs = len(first_stage_config["params"]["ddconfig"]["ch_mult"]) - 1
        except (KeyError, TypeError):
            self.num_downs = 0
        if scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(scale_factor))
        else:
            self.scale_factor = scale_factor
        self.first_stage_model = freeze(instantiate_from_config(first_stage_config))
        self.instantiate_cond_stage(cond_stage_config)
        self.cond_stage_forward = cond_stage_forward
        self.clip_denoised = False
        self.restarted_from_ckpt = ckpt_path is not None
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)
        self._after_checkpoint(ckpt_path, reset_ema, reset_num_ema_updates)

    def register_schedule(self, *args: Any, **kwargs: Any) -> None:
        """DDPM schedule, plus the shortened conditioning schedule when num_timesteps_cond > 1."""
        super().register_schedule(*args, **kwargs)
        self.shorten_cond_schedule = self.num_timesteps_cond > 1
        if self.shorten_cond_schedule:
            self.cond_ids = torch.full((self.num_timesteps,), self.num_timesteps - 1, dtype=torch.long)
            ids = torch.round(torch.linspace(0, self.num_timesteps - 1, self.num_timesteps_cond)).long()
            self.cond_ids[:self.num_timesteps_cond] = ids

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        """The first stage's encoding of images x [B, 3, H, W] (the KL posterior, not yet scaled)."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents [B, C, h, w] = scale_factor * (a posterior SAMPLE, or the given tensor)."""
        if torch.is_tensor(encoder_posterior):
            z = encoder_posterior
        elif callable(getattr(encoder_posterior, "sample", None)):
            z = encoder_posterior.sample() if generator is None else encoder_posterior.sample(generator=generator)
        else:
            raise TypeError(f"cannot take latents from a {type(encoder_posterior).__name__}")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        """Images [B, 3, H, W] (about [-1, 1]) decoded from latents z / scale_factor."""
        if predict_cids:
            raise NotImplementedError("predict_cids is for VQ first stages, which this package does not provide")
        return self.first_stage_model.decode(1.0 / self.scale_factor * z)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, return_first_stage_outputs: bool = False,
                  force_c_encode: bool = False, cond_key: str | None = None, return_original_cond: bool = False,
                  bs: int | None = None, return_x: bool = False) -> list[Any]:
        """[z, c] (+ [x, xrec], [x], [xc] on request) of a batch: latents of ``batch[k]`` and its conditioning."""
        x = super().get_input(batch, k)
        x = (x[:bs] if bs is not None else x).to(self.device)
        z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
        c = xc = None
        if self.model.conditioning_key is not None and not self.force_null_conditioning:
            xc = self.get_raw_conditioning(batch, cond_key or self.cond_stage_key, x)
            c = xc
            if not self.cond_stage_trainable or force_c_encode:
                c = self.get_learned_conditioning(xc if isinstance(xc, (dict, list)) else xc.to(self.device))
            if bs is not None:
                c = c[:bs]
        if self.use_positional_encodings:
            raise NotImplementedError("use_positional_encodings (bounding-box latent shifts) is not supported")
        out = [z, c]
        if return_first_stage_outputs:
            out.extend([x, self.decode_first_stage(z)])
        if return_x:
            out.append(x)
        if return_original_cond:
            out.append(xc)
        return out

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, loss_dict) of a data batch; conditioning dropout is applied in training mode."""
        if self.training and self.ucg_training:
            batch = conditioning_dropout(batch, self.ucg_training, self.ucg_prng)
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def forward(self, x: torch.Tensor, c: Any, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss of latents x [B, C, h, w] with conditioning c at uniformly random timesteps."""
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=x.device).long()
        if self.model.conditioning_key is not None:
            if c is None:
                raise ValueError(f"conditioning_key '{self.model.conditioning_key}' needs a conditioning c")
            if self.cond_stage_trainable:
                c = self.get_learned_conditioning(c)
            if self.shorten_cond_schedule:
                tc = self.cond_ids.to(x.device)[t]
                c = self.q_sample(x_start=c, t=tc, noise=torch.randn_like(c.float()))
        return self.p_losses(x, c, t, *args, **kwargs)

    @torch.no_grad()
    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int, *args: Any) -> None:
        """With scale_by_std, set scale_factor = 1 / std of the first batch's latents (once, at step 0)."""
        if self.scale_by_std and batch_idx == 0 and not self.restarted_from_ckpt and float(self.scale_factor) == 1.0:
            x = DDPM.get_input(self, batch, self.first_stage_key).to(self.device)
            z = self.get_first_stage_encoding(self.encode_first_stage(x)).detach()
            self.scale_factor.copy_(1.0 / z.flatten().std())
            logger.info("setting scale_factor to %.6f", float(self.scale_factor))
from ldm.models.diffusion.inpaint_model import LatentFinetuneDiffusion, LatentInpaintDiffusion  # noqa: E402,F401

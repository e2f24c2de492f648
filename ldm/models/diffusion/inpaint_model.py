"""The inpainting model classes, at their original config path ``ldm.models.diffusion.ddpm.LatentInpaintDiffusion``
(``ddpm`` imports them from here: import them from ``ddpm``, which defines their base class first)."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Optional, Sequence

import torch

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.inpaint import binarize_mask, concat_conditioning, latent_mask, masked_image

logger = logging.getLogger(__name__)

FINETUNE_KEYS = ("model.diffusion_model.input_blocks.0.0.weight", "model_ema.diffusion_modelinput_blocks00weight")


class LatentFinetuneDiffusion(LatentDiffusion):
    """A LatentDiffusion whose UNet takes extra ``c_concat`` inputs; with ``finetune_keys`` and ``ckpt_path`` it
    starts from a regular checkpoint, keeping its first ``keep_finetune_dims`` input channels (the rest zero)."""

    def __init__(self, concat_keys: Sequence[str], finetune_keys: Optional[Sequence[str]] = FINETUNE_KEYS,
                 keep_finetune_dims: int = 4, c_concat_log_start: Optional[int] = None,
                 c_concat_log_end: Optional[int] = None, *args: Any, **kwargs: Any) -> None:
        ckpt_path = kwargs.pop("ckpt_path", None)
        ignore_keys = kwargs.pop("ignore_keys", ())
        super().__init__(*args, **kwargs)
        self.finetune_keys = tuple(finetune_keys) if finetune_keys is not None else None
        self.concat_keys = tuple(concat_keys)
        self.keep_dims = keep_finetune_dims
        self.c_concat_log_start, self.c_concat_log_end = c_concat_log_start, c_concat_log_end
        if self.finetune_keys is not None and ckpt_path is None:
            raise ValueError("finetune_keys needs a ckpt_path to fine-tune from (inference configs set "
                             "finetune_keys: null)")
        if ckpt_path is not None:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = (), only_model: bool = False) -> None:
        """Load a checkpoint strictly (as :func:`load_checkpoint_into`); ``finetune_keys`` of another input width are
        widened (extra channels zero)."""
        if not self.finetune_keys:
            return super().init_from_ckpt(path, ignore_keys, only_model)
        from ldm.checkpoint import (TRAINING_ONLY_PREFIXES, drop_ignored_keys, load_config_checkpoint,
                                    load_state_dict_file)

        sd = load_state_dict_file(path)
        drop_ignored_keys(sd, ignore_keys)
        own = self.state_dict()
        for key in self.finetune_keys:
            if key in sd and key in own and sd[key].shape != own[key].shape:
                widened = torch.zeros_like(own[key], device="cpu")
                widened[:, :self.keep_dims] = sd[key][:, :self.keep_dims]
                logger.info("%s: %s -> %s (new input channels start at zero)", key, tuple(sd[key].shape),
                            tuple(own[key].shape))
                sd[key] = widened
        load_config_checkpoint(self, sd, path, ignore_keys, allow_unexpected=TRAINING_ONLY_PREFIXES,
                               allow_missing=TRAINING_ONLY_PREFIXES)


class LatentInpaintDiffusion(LatentFinetuneDiffusion):
    """SD inpainting model (``conditioning_key: hybrid``, UNet ``in_channels`` = C + 1 + C = 9 for SD 1/2)."""

    def __init__(self, concat_keys: Sequence[str] = ("mask", "masked_image"),
                 masked_image_key: str = "masked_image", *args: Any, **kwargs: Any) -> None:
        super().__init__(concat_keys, *args, **kwargs)
        if masked_image_key not in self.concat_keys:
            raise ValueError(f"masked_image_key '{masked_image_key}' must be one of concat_keys {self.concat_keys}")
        self.masked_image_key = masked_image_key

    @torch.no_grad()
    def encode_masked(self, image: torch.Tensor, mask: torch.Tensor,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """``c_concat`` [B, 1 + C, h, w] of images [B, 3, H, W] in [-1, 1] and masks [B, 1, H, W] (1 = repaint)."""
        mask = binarize_mask(mask)
        posterior = self.encode_first_stage(masked_image(image, mask))
        return concat_conditioning(mask, self.get_first_stage_encoding(posterior, generator))

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, cond_key: Optional[str] = None, bs: Optional[int] = None,
                  return_first_stage_outputs: bool = False, **kwargs: Any) -> list[Any]:
        """[z, {"c_concat": [mask, masked latent], "c_crossattn": [c]}] (+ [x, xrec]) of a training batch that
        holds ``mask`` and ``masked_image`` ([B, H, W, C]) besides the image and the caption."""
        if self.cond_stage_trainable:
            raise ValueError("inpainting models need a frozen cond stage (cond_stage_trainable: false)")
        z, c, x, xrec, _ = super().get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                             force_c_encode=True, return_original_cond=True, bs=bs)
        parts = []
        for key in self.concat_keys:
            cc = batch[key]
            cc = (cc[..., None] if cc.dim() == 3 else cc).permute(0, 3, 1, 2).float()
            cc = (cc[:bs] if bs is not None else cc).to(self.device)
            if key == self.masked_image_key:
                parts.append(self.get_first_stage_encoding(self.encode_first_stage(cc)))
            else:
                parts.append(latent_mask(cc, z.shape[-2:]))
        out = [z, {"c_concat": [torch.cat(parts, dim=1)], "c_crossattn": [c]}]
        return out + [x, xrec] if return_first_stage_outputs else out

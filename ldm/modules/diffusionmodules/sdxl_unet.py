"""The SDXL UNet: the SD 1/2 ``UNetModel`` built with the constructor arguments of ``sgm``'s UNet.

``sgm.modules.diffusionmodules.openaimodel.UNetModel`` always uses spatial transformers, has no ``image_size`` /
``legacy`` / ``use_spatial_transformer`` arguments and takes ``transformer_depth`` per level; the maths and the
state_dict keys are those of :class:`ldm.modules.diffusionmodules.openaimodel.UNetModel`, which does the work.
"""
from __future__ import annotations

import logging
from typing import Sequence

from ldm.modules.diffusionmodules.openaimodel import UNetModel

logger = logging.getLogger(__name__)

ATTN_TYPES = ("softmax", "softmax-xformers")


class SDXLUNetModel(UNetModel):
    """x [B, in, H, W], timesteps [B], context [B, M, context_dim], y [B, adm_in_channels] -> [B, out, H, W].

    ``spatial_transformer_attn_type`` names the original's kernel (``softmax`` or ``softmax-xformers``); both are the
    same maths, so it is checked and otherwise ignored: the kernel is chosen with ``set_attention_backend``.
    """

    def __init__(self, in_channels: int, model_channels: int, out_channels: int, num_res_blocks: int | Sequence[int],
                 attention_resolutions: Sequence[int], dropout: float = 0.0,
                 channel_mult: Sequence[int] = (1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | str | None = None, use_checkpoint: bool = False, num_heads: int = -1,
                 num_head_channels: int = -1, num_heads_upsample: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, transformer_depth: int | Sequence[int] = 1,
                 context_dim: int | Sequence[int] | None = None,
                 disable_self_attentions: Sequence[bool] | None = None,
                 num_attention_blocks: Sequence[int] | None = None, disable_middle_self_attn: bool = False,
                 disable_middle_transformer: bool = False, use_linear_in_transformer: bool = False,
                 spatial_transformer_attn_type: str = "softmax", adm_in_channels: int | None = None) -> None:
        if context_dim is None:
            raise ValueError("the SDXL UNet needs context_dim (the width of the cross-attention context)")
        if disable_middle_transformer:
            raise ValueError("disable_middle_transformer=True is not supported (no SDXL checkpoint uses it)")
        if spatial_transformer_attn_type not in ATTN_TYPES:
            raise ValueError(f"spatial_transformer_attn_type must be one of {ATTN_TYPES}, "
                             f"got '{spatial_transformer_attn_type}'")
        super().__init__(image_size=0, in_channels=in_channels, model_channels=model_channels,
                         out_channels=out_channels, num_res_blocks=num_res_blocks,
                         attention_resolutions=list(attention_resolutions), dropout=dropout,
                         channel_mult=list(channel_mult), conv_resample=conv_resample, dims=dims,
                         num_classes=num_classes, use_checkpoint=use_checkpoint, num_heads=num_heads,
                         num_head_channels=num_head_channels, num_heads_upsample=num_heads_upsample,
                         use_scale_shift_norm=use_scale_shift_norm, resblock_updown=resblock_updown,
                         use_spatial_transformer=True, transformer_depth=transformer_depth,
                         context_dim=context_dim, legacy=False, disable_self_attentions=disable_self_attentions,
                         num_attention_blocks=num_attention_blocks,
                         disable_middle_self_attn=disable_middle_self_attn,
                         use_linear_in_transformer=use_linear_in_transformer, adm_in_channels=adm_in_channels)
        if spatial_transformer_attn_type == "softmax-xformers":
            logger.debug("spatial_transformer_attn_type 'softmax-xformers': same maths as the default kernel; "
                         "use ldm.modules.attention.set_attention_backend(model, 'xformers') to choose xformers")

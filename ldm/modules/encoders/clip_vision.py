"""CLIP vision transformer in the Hugging Face key layout (``vision_model.*``), used by the safety checker."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import torch
from torch import nn

from ldm.modules.encoders.clip_text import CLIPEncoder, fill_position_ids


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Architecture of a CLIP vision transformer; the defaults are transformers' ``CLIPVisionConfig`` defaults."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CLIPVisionConfig":
        """Pick the architecture fields from an HF vision config dict (other keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @property
    def num_positions(self) -> int:
        """Number of patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


class CLIPVisionEmbeddings(nn.Module):
    """Class token + patch embeddings + learned positions: pixels [B, C, H, W] -> [B, 1 + patches, D]."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.randn(config.hidden_size))
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = nn.Embedding(config.num_positions, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(config.num_positions).unsqueeze(0))
        self.register_load_state_dict_pre_hook(fill_position_ids)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Embed ``pixel_values`` [B, C, image_size, image_size]."""
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding(self.position_ids)


class CLIPVisionTransformer(nn.Module):
    """Embeddings, ``pre_layrnorm`` (sic), encoder, ``post_layernorm`` on the class token."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = CLIPEncoder(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                                   config.num_attention_heads, config.hidden_act, config.layer_norm_eps)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last_hidden_state [B, 1 + patches, D], pooled output = post_layernorm(class token) [B, D])."""
        last = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))[-1]
        return last, self.post_layernorm(last[:, 0, :])


class CLIPVisionModel(nn.Module):
    """HF-layout CLIP vision model: the keys start with ``vision_model.``."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.vision_model = CLIPVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(last_hidden_state [B, 1 + patches, D], pooled output [B, D])."""
        return self.vision_model(pixel_values)

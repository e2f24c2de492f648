"""CLIP transformer in the Hugging Face key layout (``text_model.*``), on plain torch.

The SD1 checkpoints store their text encoder as transformers' ``CLIPTextModel``; this module
reproduces that module tree (and so the state_dict keys) and its maths without the
transformers package. The encoder layers are shared with the vision tower in ``clip_vision``.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CLIPTextConfig:
    """Architecture of a CLIP text transformer; the defaults are transformers' ``CLIPTextConfig`` defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "CLIPTextConfig":
        """Pick the architecture fields from an HF config dict (other keys are ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


# openai/clip-vit-large-patch14, text part: the SD1 text encoder.
VIT_L14_TEXT = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)


def merged_sub_config(config: Mapping[str, Any], part: str) -> dict:
    """The ``text``/``vision`` part of an HF ``CLIPConfig`` dict; ``<part>_config_dict`` wins (transformers 4.19)."""
    sub = dict(config.get(f"{part}_config") or {})
    sub.update(config.get(f"{part}_config_dict") or {})
    return sub


def load_text_config(version: str | Path) -> CLIPTextConfig:
    """Text architecture for ``version``: a folder with an HF ``config.json``, else the ViT-L/14 text defaults."""
    path = Path(version)
    config_file = path / "config.json" if path.is_dir() else path
    if config_file.is_file() and config_file.suffix == ".json":
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
        if config.get("model_type") == "clip" or "text_config" in config or "text_config_dict" in config:
            config = merged_sub_config(config, "text")
        return CLIPTextConfig.from_dict(config)
    if path.is_dir():
        raise FileNotFoundError(f"text encoder folder '{path}' has no config.json; add an HF CLIPTextConfig there")
    logger.debug("'%s' is not a local config; using the CLIP ViT-L/14 text architecture (nothing is downloaded)",
                 version)
    return VIT_L14_TEXT


def activation(name: str):
    """The MLP activation named in an HF CLIP config (``quick_gelu``, ``gelu``, ``gelu_new``, ``relu``)."""
    table = {
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }
    if name not in table:
        raise ValueError(f"unsupported hidden_act '{name}' in the CLIP config; use one of {sorted(table)}")
    return table[name]


def fill_position_ids(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Load pre-hook: supply ``position_ids`` when a checkpoint lacks it, and repair non-arange values."""
    key = prefix + "position_ids"
    expected = torch.arange(module.position_ids.shape[-1], dtype=torch.long).unsqueeze(0)
    given = state_dict.get(key)
    if given is None:
        state_dict[key] = expected
        return
    if given.is_meta:
        return
    values = given.detach().to("cpu", torch.float64)
    if given.shape != expected.shape or not torch.equal(values, expected.double()):
        logger.warning("checkpoint key '%s' does not hold 0..%d; using the correct positions instead",
                       key, expected.shape[-1] - 1)
        state_dict[key] = expected
    elif given.dtype != torch.long:
        state_dict[key] = expected


class CLIPAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections: [B, L, D] -> [B, L, D]."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Self-attention over ``x`` [B, L, D], causal (text) or full (vision)."""
        b, n, d = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x)),
                                             is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class CLIPMLP(nn.Module):
    """fc1 -> activation -> fc2: [B, L, D] -> [B, L, D]."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.act = activation(hidden_act)
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Position-wise feed-forward."""
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block: ``x += attn(ln1(x)); x += mlp(ln2(x))`` on [B, L, D]."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, hidden_act: str, eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(hidden_size, num_heads)
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = CLIPMLP(hidden_size, intermediate_size, hidden_act)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """One block on [B, L, D]."""
        x = x + self.self_attn(self.layer_norm1(x), causal=causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """Stack of ``layers``; returns every hidden state (embeddings output first), as HF's ``hidden_states``."""

    def __init__(self, num_layers: int, hidden_size: int, intermediate_size: int, num_heads: int,
                 hidden_act: str, eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(hidden_size, intermediate_size, num_heads, hidden_act, eps) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, causal: bool = False, stop_at: Optional[int] = None) -> list[torch.Tensor]:
        """Hidden states [x, layer1(x), ...] of shape [B, L, D]; stops after ``stop_at`` layers if given."""
        states = [x]
        for layer in self.layers[:stop_at]:
            states.append(layer(states[-1], causal=causal))
        return states


class CLIPTextEmbeddings(nn.Module):
    """Token + learned position embeddings: ids [B, L] -> [B, L, D]."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings).unsqueeze(0))
        self.register_load_state_dict_pre_hook(fill_position_ids)

    def forward(self, input_ids: torch.Tensor, inputs_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Embed ``input_ids`` [B, L] (L <= max_position_embeddings); ``inputs_embeds`` [B, L, D] replaces the
        token embeddings when given."""
        positions = self.position_ids[:, : input_ids.shape[-1]]
        tokens = self.token_embedding(input_ids) if inputs_embeds is None else inputs_embeds
        return tokens + self.position_embedding(positions)


class CLIPTextTransformer(nn.Module):
    """Embeddings, causal encoder and ``final_layer_norm`` (the ``text_model`` of HF's CLIPTextModel)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config.num_hidden_layers, config.hidden_size, config.intermediate_size,
                                   config.num_attention_heads, config.hidden_act, config.layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last_hidden_state [B, L, D] after final_layer_norm, hidden states list of num_layers + 1 [B, L, D])."""
        states = self.encoder(self.embeddings(input_ids, inputs_embeds), causal=True)
        return self.final_layer_norm(states[-1]), states


class CLIPTextModel(nn.Module):
    """HF-layout CLIP text model: the keys start with ``text_model.``."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(config)

    @property
    def config(self) -> CLIPTextConfig:
        """The architecture this model was built with."""
        return self.text_model.config

    def forward(self, input_ids: torch.Tensor,
                inputs_embeds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last_hidden_state [B, L, D], hidden states); see ``CLIPTextTransformer.forward``."""
        return self.text_model(input_ids, inputs_embeds)

    def pooled(self, input_ids: torch.Tensor, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """HF ``pooler_output``: the state at the end-of-text token (the largest id): [B, D]."""
        index = input_ids.to(last_hidden_state.device).argmax(dim=-1)
        return last_hidden_state[torch.arange(last_hidden_state.shape[0], device=index.device), index]

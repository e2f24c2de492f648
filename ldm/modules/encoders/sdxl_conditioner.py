"""SDXL conditioning (``sgm``'s ``GeneralConditioner`` and its embedders) on the project's own text encoders.

The conditioner runs a list of embedders, each on one entry of the batch dict (``input_key``), and sorts their
outputs by rank: 3-dim outputs are concatenated on the feature axis into ``crossattn`` [B, 77, sum of widths],
2-dim outputs on dim 1 into ``vector`` [B, sum] (the UNet's ``y``). The unconditional batch zeroes the outputs of
the embedders named in ``force_uc_zero_embeddings`` (``["txt"]``: the text, cross-attention and pooled parts).
"""
from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.tokenizer import Prompts
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)


class FrozenCLIPTextEmbedder(FrozenCLIPEmbedder):
    """SDXL's first text encoder (``sgm``'s ``FrozenCLIPEmbedder``): the SD 1 HF-layout CLIP text model, usually
    ``layer: hidden`` (``hidden_states[layer_idx]``, no final LayerNorm); with ``always_return_pooled`` it also
    returns the pooled output [B, width] (final LayerNorm at the end-of-text token)."""

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device: str = "cpu", max_length: int = 77,
                 freeze: bool = True, layer: str = "last", layer_idx: Optional[int] = None,
                 always_return_pooled: bool = False) -> None:
        super().__init__(version=version, device=device, max_length=max_length, freeze=freeze, layer=layer,
                         layer_idx=layer_idx)
        self.return_pooled = always_return_pooled

    def forward(self, text: Prompts) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Hidden states [B, 77, width] (and pooled [B, width] with ``always_return_pooled``)."""
        if not self.return_pooled:
            return super().forward(text)
        tokens = self.tokenize(text).to(self.device)
        last, states = self.transformer(tokens)
        pooled = self.transformer.pooled(tokens, last)
        if self.layer == "hidden":
            return states[self.layer_idx], pooled
        return (last if self.layer == "last" else pooled[:, None, :]), pooled


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's OpenCLIP text encoder (bigG): per-token features of the ``last`` or ``penultimate`` block and, with
    ``always_return_pooled``, the pooled embedding ``ln_final(last)[eot] @ text_projection`` [B, embed_dim].

    ``legacy=True`` (SD 2 style) applies ``ln_final`` to the per-token features; ``legacy=False`` (SDXL) does not.
    """

    def __init__(self, arch: str = "ViT-H-14", version: Optional[str] = "laion2b_s32b_b79k", device: str = "cpu",
                 max_length: int = 77, freeze: bool = True, layer: str = "last", always_return_pooled: bool = False,
                 legacy: bool = True, arch_config: Optional[Mapping[str, Any]] = None) -> None:
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy: false (as in the SDXL configs)")
        super().__init__(arch=arch, version=version, device=device, max_length=max_length, freeze=freeze,
                         layer=layer, arch_config=arch_config)
        self.return_pooled = always_return_pooled
        self.legacy = legacy

    def hidden_states(self, tokens: torch.Tensor,
                      token_embeds: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """{"penultimate", "last"}: the raw outputs [B, L, width] of all blocks but the last, and of all blocks."""
        x, mask = self.embed_tokens(tokens, token_embeds)
        n = len(self.model.transformer.resblocks)
        penultimate = self.text_transformer_forward(x, attn_mask=mask, blocks=slice(0, n - 1))
        last = self.text_transformer_forward(penultimate, attn_mask=mask, blocks=slice(n - 1, n))
        return {"penultimate": penultimate, "last": last}

    def pool(self, last_normed: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """The features at each row's end-of-text token (its largest id) projected: [B, width] -> [B, embed_dim]."""
        eot = tokens.to(last_normed.device).argmax(dim=-1)
        x = last_normed[torch.arange(last_normed.shape[0], device=eot.device), eot]
        projection = self.model.text_projection
        return projection(x) if isinstance(projection, nn.Module) else x @ projection

    def encode_tokens_with_pooled(self, tokens: torch.Tensor,
                                  token_embeds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-token features [B, L, width] of ``layer``, pooled [B, embed_dim]) of tokens [B, L]."""
        states = self.hidden_states(tokens.to(self.device), token_embeds)
        z = states[self.layer]
        if self.legacy:
            z = self.model.ln_final(z)
        return z, self.pool(self.model.ln_final(states["last"]), tokens)

    def encode_with_transformer(self, tokens: torch.Tensor,
                                token_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Per-token features [B, L, width] of ``layer`` (``ln_final`` applied only when ``legacy``)."""
        return self.encode_tokens_with_pooled(tokens, token_embeds)[0]

    def forward(self, text: Prompts) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Features [B, 77, width], and pooled [B, embed_dim] with ``always_return_pooled``."""
        z, pooled = self.encode_tokens_with_pooled(self.tokenize(text))
        return (z, pooled) if self.return_pooled else z


class ConcatTimestepEmbedderND(nn.Module):
    """Each of the n scalars per row separately as a sinusoidal embedding: [B, n] (or [B]) -> [B, n * outdim]."""

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``cat([cos(v f), sin(v f)])`` of every value v (in float32), concatenated in input order."""
        x = torch.as_tensor(x)
        if x.dim() == 1:
            x = x[:, None]
        if x.dim() != 2:
            raise ValueError(f"ConcatTimestepEmbedderND expects a [B, n] tensor, got shape {list(x.shape)}")
        b, dims = x.shape
        return timestep_embedding(x.reshape(-1), self.outdim).reshape(b, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """A list of embedders (``emb_models``: configs with ``input_key``, ``is_trainable``, ``ucg_rate``): batch dict
    -> {"crossattn": [B, L, D], "vector": [B, V]} (and "concat" for 4-dim outputs)."""

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList(self._build(n, cfg) for n, cfg in enumerate(emb_models))

    @staticmethod
    def _build(n: int, cfg: Mapping[str, Any]) -> nn.Module:
        """One embedder with its slot settings (input key, trainability, dropout rate)."""
        embedder = instantiate_from_config(cfg)
        embedder.is_trainable = bool(cfg.get("is_trainable", False))
        embedder.ucg_rate = float(cfg.get("ucg_rate", 0.0))
        if cfg.get("legacy_ucg_value") is not None:
            logger.warning("conditioner embedder #%d: 'legacy_ucg_value' is a training option of the original; "
                           "ignored here", n)
        if "input_key" in cfg:
            embedder.input_key, embedder.input_keys = cfg["input_key"], None
        elif "input_keys" in cfg:
            embedder.input_key, embedder.input_keys = None, list(cfg["input_keys"])
        else:
            raise KeyError(f"conditioner embedder #{n} ({type(embedder).__name__}) needs 'input_key' or 'input_keys'")
        if not embedder.is_trainable:
            embedder.eval()
            for param in embedder.parameters():
                param.requires_grad = False
        logger.debug("embedder #%d: %s on '%s'", n, type(embedder).__name__, embedder.input_key or embedder.input_keys)
        return embedder

    @property
    def device(self) -> torch.device:
        """Where the embedders' parameters live (tensor inputs are moved there)."""
        return next((p.device for p in self.parameters()), torch.device("cpu"))

    def _inputs(self, n: int, embedder: nn.Module, batch: Mapping[str, Any]) -> list[Any]:
        """The batch entries embedder ``n`` reads (tensors moved to the conditioner's device)."""
        keys = [embedder.input_key] if embedder.input_key is not None else embedder.input_keys
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"conditioner embedder #{n} ({type(embedder).__name__}) reads batch['{missing[0]}'], which "
                           f"the batch lacks (it has {sorted(batch)})")
        return [batch[k].to(self.device) if torch.is_tensor(batch[k]) else batch[k] for k in keys]

    def _dropped(self, embedder: nn.Module, emb: torch.Tensor) -> torch.Tensor:
        """Training only: zero whole rows with probability ``ucg_rate`` (conditioning dropout for guidance)."""
        if not (self.training and embedder.ucg_rate > 0.0):
            return emb
        keep = torch.bernoulli(torch.full((emb.shape[0],), 1.0 - embedder.ucg_rate, device=emb.device))
        return keep.reshape(-1, *([1] * (emb.dim() - 1))).to(emb.dtype) * emb

    def forward(self, batch: Mapping[str, Any], force_zero_embeddings: Optional[Sequence[str]] = None
                ) -> dict[str, torch.Tensor]:
        """Embed ``batch`` (e.g. {"txt": prompts, "original_size_as_tuple": [B, 2], ...}); embedders whose input key
        is in ``force_zero_embeddings`` give zeros."""
        force_zero = set(force_zero_embeddings or ())
        output: dict[str, torch.Tensor] = {}
        for n, embedder in enumerate(self.embedders):
            with nullcontext() if embedder.is_trainable else torch.no_grad():
                outs = embedder(*self._inputs(n, embedder, batch))
            for emb in outs if isinstance(outs, (list, tuple)) else [outs]:
                if emb.dim() not in self.OUTPUT_DIM2KEYS:
                    raise ValueError(f"conditioner embedder #{n} gave a {emb.dim()}-dim output; expected 2 to 5")
                key = self.OUTPUT_DIM2KEYS[emb.dim()]
                emb = self._dropped(embedder, emb)
                if embedder.input_key in force_zero:
                    emb = torch.zeros_like(emb)
                output[key] = torch.cat((output[key], emb), self.KEY2CATDIM[key]) if key in output else emb
        return output

    def get_unconditional_conditioning(self, batch_c: Mapping[str, Any], batch_uc: Optional[Mapping[str, Any]] = None,
                                       force_uc_zero_embeddings: Optional[Sequence[str]] = None,
                                       force_cond_zero_embeddings: Optional[Sequence[str]] = None
                                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(c, uc): conditionings of ``batch_c`` and of ``batch_uc`` (default ``batch_c``), never dropped out."""
        rates = [embedder.ucg_rate for embedder in self.embedders]
        for embedder in self.embedders:
            embedder.ucg_rate = 0.0
        try:
            c = self(batch_c, force_cond_zero_embeddings)
            uc = self(batch_c if batch_uc is None else batch_uc, force_uc_zero_embeddings)
        finally:
            for embedder, rate in zip(self.embedders, rates):
                embedder.ucg_rate = rate
        return c, uc

"""Frozen text encoders of Stable Diffusion: SD1 (HF-layout CLIP ViT-L/14) and SD2 (OpenCLIP).

Nothing is downloaded: the architectures come from local configs or built-in defaults and every
weight is loaded afterwards from the SD checkpoint (``cond_stage_model.*``).
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ldm.modules.encoders.clip_text import CLIPTextModel, load_text_config
from ldm.modules.encoders.prompt_chunks import Chunk, ChunkSpec, Placed, encode_chunks, place_vectors, prompt_chunks
from ldm.modules.encoders.tokenizer import (COMMA_TOKEN, EOT_TOKEN, SOT_TOKEN, Prompts, as_list, hf_bpe_ids,
                                            open_clip_bpe_ids, open_clip_tokenize, sd1_tokenize, truncated_text)

logger = logging.getLogger(__name__)

# Stand-in for the image tower, which the SD2 embedder deletes right after construction anyway.
_DISCARDED_VISION_CFG = {"image_size": 16, "patch_size": 16, "width": 16, "layers": 1, "head_width": 16}


class AbstractEncoder(nn.Module):
    """Base class of the conditioning encoders: ``encode(x)`` gives the conditioning."""

    def encode(self, *args: Any, **kwargs: Any) -> Any:
        """Conditioning for the given input."""
        raise NotImplementedError


class _FrozenTextEncoder(AbstractEncoder):
    """Shared behaviour of the text encoders: freezing, device and dtype from the parameters."""

    @property
    def device(self) -> torch.device:
        """Device of the parameters (tokens are moved there)."""
        return next(self.parameters()).device

    def freeze(self) -> None:
        """Evaluation mode and no gradients for every parameter."""
        self.eval()
        for param in self.parameters():
            param.requires_grad = False

    def encode(self, text: Prompts) -> torch.Tensor:
        """Conditioning [B, 77, width] for a prompt or a list of prompts (plain text, cut at 77 tokens)."""
        return self(text)

    @property
    def supports_prompt_chunks(self) -> bool:
        """Whether ``encode_prompts`` gives per-token features (long and weighted prompts)."""
        return True

    @property
    def clip_skip_layers(self) -> int:
        """How many transformer layers the web UI's "Clip skip" may count on this encoder (0: it has none)."""
        return 0

    def chunk_spec(self) -> ChunkSpec:
        """Token ids and chunk size of this encoder's prompt chunks."""
        raise NotImplementedError

    def bpe_ids(self, text: str) -> list[int]:
        """BPE ids of ``text`` as this encoder's tokenizer makes them (no start/end tokens)."""
        raise NotImplementedError

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[list[list[Placed]]] = None) -> torch.Tensor:
        """Token ids [N, L] (textual-inversion vectors placed per row) -> features [N, L, width]."""
        raise NotImplementedError

    def prompt_chunks(self, prompt: str, embeddings: Any = None) -> list[Chunk]:
        """The 75-token chunks of a prompt in web-UI syntax; ``embeddings`` (an ``EmbeddingLibrary``) or None."""
        find = embeddings.finder(self.bpe_ids, self.token_width) if embeddings is not None else None
        return prompt_chunks(prompt, self.bpe_ids, self.chunk_spec(), find)

    def encode_prompts(self, text: Prompts, embeddings: Any = None) -> torch.Tensor:
        """Conditioning [B, k * 77, width] of long / weighted / BREAK prompts, all padded to the same k chunks.

        A prompt without weights and within 75 tokens gives exactly ``encode``'s result.
        """
        if not self.supports_prompt_chunks:
            return self.encode(text)
        batch = [self.prompt_chunks(prompt, embeddings) for prompt in as_list(text)]
        return encode_chunks(self, batch, self.chunk_spec())


class FrozenCLIPEmbedder(_FrozenTextEncoder):
    """SD1 text encoder: CLIP text transformer in the transformers ``CLIPTextModel`` layout (``transformer.*``).

    ``version`` is a local folder with an HF ``config.json`` (CLIPTextConfig or CLIPConfig); any other
    value (e.g. ``openai/clip-vit-large-patch14``) selects the ViT-L/14 text architecture. Prompts are
    padded with the end-of-text token, as the SD1 tokenizer does.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version: str = "openai/clip-vit-large-patch14", device: str = "cpu", max_length: int = 77,
                 freeze: bool = True, layer: str = "last", layer_idx: Optional[int] = None):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got '{layer}'")
        config = load_text_config(version)
        if max_length > config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's {config.max_position_embeddings} positions")
        if layer == "hidden" and (layer_idx is None or abs(layer_idx) > config.num_hidden_layers):
            raise ValueError(f"layer 'hidden' needs layer_idx in [-{config.num_hidden_layers}, "
                             f"{config.num_hidden_layers}], got {layer_idx}")
        self.transformer = CLIPTextModel(config)
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        # the web UI's "Clip skip": N > 1 takes the output of the N-th layer from the end, through the final layer
        # norm, instead of the last layer's (layer "last" only; set it with ldm.inference.pipeline.clip_skip)
        self.clip_skip = 1
        logger.debug("FrozenCLIPEmbedder(version=%r): device argument %r ignored; the parameters' device is used",
                     version, device)
        if freeze:
            self.freeze()

    def tokenize(self, text: Prompts) -> torch.Tensor:
        """Token ids [B, max_length] int64 (SOT, BPE, EOT, EOT padding) on CPU."""
        return sd1_tokenize(text, self.max_length)

    def dropped_words(self, text: str) -> str:
        """The end of ``text`` that truncation to ``max_length`` tokens removes ('' when it fits)."""
        return truncated_text(text, self.max_length, "hf")

    @property
    def supports_prompt_chunks(self) -> bool:
        """Per-token layers chunk long prompts; the 'pooled' layer (one vector) does not."""
        return self.layer != "pooled"

    @property
    def token_width(self) -> int:
        """Width of the token embeddings (of textual-inversion vectors)."""
        return self.transformer.text_model.embeddings.token_embedding.weight.shape[1]

    @property
    def clip_skip_layers(self) -> int:
        """The transformer's layer count for layer "last" (SD 1), 0 for the others (SDXL's CLIP-L, pooled)."""
        return len(self.transformer.text_model.encoder.layers) if self.layer == "last" else 0

    def _output(self, last: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """The features of layer 'last' (or its ``clip_skip``-th from the end, normed) or 'hidden'."""
        if self.layer != "last":
            return states[self.layer_idx]
        if self.clip_skip > 1:
            return self.transformer.text_model.final_layer_norm(states[-self.clip_skip])
        return last

    def chunk_spec(self) -> ChunkSpec:
        """SD 1 chunks: start, 75 tokens, end, padded with the end token."""
        return ChunkSpec(SOT_TOKEN, EOT_TOKEN, EOT_TOKEN, COMMA_TOKEN, self.max_length - 2)

    def bpe_ids(self, text: str) -> list[int]:
        """BPE ids as transformers' CLIPTokenizer makes them."""
        return hf_bpe_ids(text)

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[list[list[Placed]]] = None) -> torch.Tensor:
        """Token ids [N, L] -> hidden states [N, L, hidden] of layer 'last' or 'hidden' (vectors placed per row)."""
        tokens = tokens.to(self.device)
        embeds = None
        if vectors:
            embeds = place_vectors(self.transformer.text_model.embeddings.token_embedding(tokens), vectors)
        last, states = self.transformer(tokens, inputs_embeds=embeds)
        return self._output(last, states)

    def forward(self, text: Prompts) -> torch.Tensor:
        """Hidden states [B, max_length, hidden] (or [B, 1, hidden] for layer 'pooled')."""
        tokens = self.tokenize(text).to(self.device)
        last, states = self.transformer(tokens)
        if self.layer == "pooled":
            return self.transformer.pooled(tokens, last)[:, None, :]
        return self._output(last, states)


def _plain(config: Mapping[str, Any]) -> dict:
    """A deep plain-dict copy of a (possibly OmegaConf) mapping: open_clip's dataclasses need real dicts."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        DictConfig = ()
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return copy.deepcopy({k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()})


def open_clip_config(arch: str, arch_config: Optional[Mapping[str, Any]]) -> dict:
    """The open_clip model config dict (embed_dim, vision_cfg, text_cfg, ...) for ``arch`` or ``arch_config``."""
    import open_clip

    if arch_config is not None:
        config = _plain(arch_config)
    else:
        config = open_clip.get_model_config(arch)
        if config is None:
            raise ValueError(f"unknown open_clip architecture '{arch}'; register its config with "
                             "open_clip.add_model_config(path) or pass arch_config={...}")
    missing = {"embed_dim", "text_cfg"} - set(config)
    if missing:
        raise ValueError(f"open_clip config for '{arch}' lacks {sorted(missing)}")
    if config.get("custom_text") or "hf_model_name" in config["text_cfg"] or "multimodal_cfg" in config:
        raise ValueError(f"open_clip architecture '{arch}' has a custom text tower; SD2 needs a plain CLIP text "
                         "transformer")
    return config


def build_open_clip_text(arch: str, arch_config: Optional[Mapping[str, Any]] = None) -> nn.Module:
    """An open_clip ``CLIP`` model with random weights and without its image tower (nothing downloaded)."""
    import open_clip

    config = open_clip_config(arch, arch_config)
    config["vision_cfg"] = dict(_DISCARDED_VISION_CFG)  # deleted below; keeps construction cheap
    config.pop("custom_text", None)
    model = open_clip.CLIP(**config)
    del model.visual
    return model


class FrozenOpenCLIPEmbedder(_FrozenTextEncoder):
    """SD2 text encoder: OpenCLIP text transformer (``model.*``), output of the last or penultimate block.

    ``version`` names the original pretrained tag; it is never downloaded (weights come from the SD
    checkpoint). ``arch_config`` builds an unregistered open_clip config (embed_dim, vision_cfg, text_cfg).
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch: str = "ViT-H-14", version: Optional[str] = "laion2b_s32b_b79k", device: str = "cpu",
                 max_length: int = 77, freeze: bool = True, layer: str = "last",
                 arch_config: Optional[Mapping[str, Any]] = None):
        super().__init__()
        if layer not in self.LAYERS:
            raise ValueError(f"layer must be one of {self.LAYERS}, got '{layer}'")
        self.model = build_open_clip_text(arch, arch_config)
        if version:
            logger.debug("FrozenOpenCLIPEmbedder: version %r names the original pretrained weights; not downloaded, "
                         "the weights come from the checkpoint", version)
        logger.debug("FrozenOpenCLIPEmbedder: device argument %r ignored; the parameters' device is used", device)
        if max_length != self.model.context_length:
            logger.warning("max_length %d differs from the model's context length %d; using %d",
                           max_length, self.model.context_length, self.model.context_length)
        self.max_length = self.model.context_length
        self.layer = layer
        self.layer_idx = 0 if layer == "last" else 1
        if freeze:
            self.freeze()

    def tokenize(self, text: Prompts) -> torch.Tensor:
        """Token ids [B, 77] int64 from open_clip (0-padded) on CPU."""
        return open_clip_tokenize(text, self.max_length)

    def dropped_words(self, text: str) -> str:
        """The end of ``text`` that truncation to the context length removes ('' when it fits)."""
        return truncated_text(text, self.max_length, "open_clip")

    @property
    def token_width(self) -> int:
        """Width of the token embeddings (of textual-inversion vectors)."""
        return self.model.token_embedding.weight.shape[1]

    def chunk_spec(self) -> ChunkSpec:
        """SD 2 chunks: start, 75 tokens, end, padded with 0 after the end token (as ``open_clip.tokenize``)."""
        return ChunkSpec(SOT_TOKEN, EOT_TOKEN, 0, COMMA_TOKEN, self.max_length - 2)

    def bpe_ids(self, text: str) -> list[int]:
        """BPE ids as ``open_clip.tokenize`` makes them."""
        return open_clip_bpe_ids(text)

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[list[list[Placed]]] = None) -> torch.Tensor:
        """Token ids [N, L] -> features [N, L, width] (vectors placed per row)."""
        tokens = tokens.to(self.device)
        embeds = place_vectors(self.model.token_embedding(tokens), vectors) if vectors else None
        return self.encode_with_transformer(tokens, embeds)

    def forward(self, text: Prompts) -> torch.Tensor:
        """Text features [B, 77, width] after ``ln_final``."""
        return self.encode_with_transformer(self.tokenize(text).to(self.device))

    def encode_with_transformer(self, tokens: torch.Tensor,
                                token_embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Tokens [B, L] -> features [B, L, width] (embeddings, blocks up to ``layer``, ln_final); ``token_embeds``
        [B, L, width] replaces the token embeddings when given."""
        x, mask = self.embed_tokens(tokens, token_embeds)
        x = self.text_transformer_forward(x, attn_mask=mask)
        return self.model.ln_final(x)

    def embed_tokens(self, tokens: torch.Tensor,
                     token_embeds: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(token + position embeddings [B, L, width], causal attention mask [L, L]) of tokens [B, L]."""
        if token_embeds is None:
            token_embeds = self.model.token_embedding(tokens)
        x = token_embeds + self.model.positional_embedding[: tokens.shape[1]]
        length = tokens.shape[1]
        mask = torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu_(1)
        return x, mask

    def text_transformer_forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                                 blocks: Optional[slice] = None) -> torch.Tensor:
        """Residual blocks on batch-first ``x`` [B, L, width]: those of ``blocks`` when given, else all but the last
        ``layer_idx``."""
        transformer = self.model.transformer
        seq_first = not getattr(transformer, "batch_first", False)
        if seq_first:  # open_clip 2.x blocks take [L, B, width]
            x = x.transpose(0, 1)
        resblocks = transformer.resblocks
        for block in resblocks[blocks if blocks is not None else slice(len(resblocks) - self.layer_idx)]:
            x = block(x, attn_mask=attn_mask)
        return x.transpose(0, 1) if seq_first else x


class ClassEmbedder(nn.Module):
    """Class-label conditioning: ``batch[key]`` [B] (int) -> ``embedding`` [B, 1, embed_dim] (a context for crossattn).

    As SD2's: with ``ucg_rate`` > 0 each label is replaced, with that probability, by the null class
    ``n_classes - 1`` (so a config reserves one extra class for it: ``n_classes`` = real classes + 1).
    Unlike the original, the dropout only acts in training mode (never while sampling).
    """

    def __init__(self, embed_dim: int, n_classes: int = 1000, key: str = "class", ucg_rate: float = 0.1) -> None:
        super().__init__()
        if n_classes < 1 or not 0.0 <= ucg_rate < 1.0:
            raise ValueError(f"ClassEmbedder needs n_classes >= 1 and 0 <= ucg_rate < 1, got {n_classes}, {ucg_rate}")
        self.key, self.n_classes, self.ucg_rate = key, int(n_classes), float(ucg_rate)
        self.embedding = nn.Embedding(n_classes, embed_dim)

    def forward(self, batch: Mapping[str, Any], key: Optional[str] = None, disable_dropout: bool = False) -> torch.Tensor:
        """Embeddings [B, 1, embed_dim] of the labels ``batch[key]`` (default: this embedder's key)."""
        key = key or self.key
        if key not in batch:
            raise KeyError(f"ClassEmbedder reads batch['{key}'], which the batch lacks (keys: {sorted(batch)}); set "
                           f"its 'key' param to the data set's label entry")
        labels = torch.as_tensor(batch[key], device=self.embedding.weight.device).long().reshape(-1, 1)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.n_classes):
            raise ValueError(f"class labels must lie in [0, {self.n_classes - 1}], got {labels.min()}..{labels.max()}")
        if self.ucg_rate > 0.0 and self.training and not disable_dropout:
            drop = torch.rand(labels.shape, device=labels.device) < self.ucg_rate
            labels = torch.where(drop, torch.full_like(labels, self.n_classes - 1), labels)
        return self.embedding(labels)

    def get_unconditional_conditioning(self, bs: int, device: Optional[torch.device | str] = None) -> dict:
        """A batch of ``bs`` null-class labels (``n_classes - 1``) under this embedder's key."""
        device = device if device is not None else self.embedding.weight.device
        return {self.key: torch.full((bs,), self.n_classes - 1, dtype=torch.long, device=device)}

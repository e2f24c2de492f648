"""Long and weighted prompts: 75-token chunks as the AUTOMATIC1111 web UI builds them, encoded and concatenated.

A prompt is parsed into weighted fragments (``prompt_weighting``), each fragment tokenized on its own, and the
tokens are poured into chunks of ``length`` (75) tokens. When a chunk is full and a comma lies within its last
``backtrack`` (20) tokens, the text after that comma moves on to the next chunk; ``BREAK`` closes a chunk early.
Each chunk becomes start + 75 tokens (end-token padded) + end, and everything after its first end token is set to
the pad id (the end token for SD 1, 0 for SD 2), which is exactly how the text encoders pad a short prompt today.
Every chunk is encoded separately; the outputs are concatenated along the sequence axis (77, 154, ... positions)
and, where some weight differs from 1, multiplied token by token and rescaled to the chunk's original mean.
Textual-inversion vectors take the place of their name's tokens (see ``textual_inversion``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol, Sequence

import torch

from ldm.modules.encoders.prompt_weighting import parse_weighted_prompt

# Vectors of a textual-inversion embedding placed at a token position: (position in the chunk, [n, width]).
Placed = tuple[int, torch.Tensor]
# (vectors, number of prompt tokens they replace) for an embedding name starting at a position, or None.
EmbeddingFinder = Callable[[Sequence[int], int], Optional[tuple[torch.Tensor, int]]]


@dataclass(frozen=True)
class ChunkSpec:
    """Token ids and sizes of an encoder's chunks: ``length`` prompt tokens between ``start`` and ``end``."""

    start: int
    end: int
    pad: int
    comma: int
    length: int = 75
    backtrack: int = 20


@dataclass
class Chunk:
    """One encoder input: ``length + 2`` token ids, a weight per token, embedding vectors placed in it."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: list[Placed] = field(default_factory=list)


class _ChunkBuilder:
    """Fills chunks token by token following the web UI's rules (comma backtracking, BREAK, embeddings)."""

    def __init__(self, spec: ChunkSpec):
        self.spec = spec
        self.chunks: list[Chunk] = []
        self.current = Chunk()
        self.last_comma = -1

    def close(self) -> None:
        """Pad the current chunk, add start/end (and the pad id after the first end), start a new one."""
        spec, chunk = self.spec, self.current
        tokens = [spec.start] + chunk.tokens + [spec.end] * (spec.length - len(chunk.tokens) + 1)
        first_end = tokens.index(spec.end)
        tokens = tokens[:first_end + 1] + [spec.pad] * (len(tokens) - first_end - 1)
        weights = [1.0] + chunk.weights + [1.0] * (spec.length - len(chunk.weights) + 1)
        self.chunks.append(Chunk(tokens, weights, [(pos + 1, vec) for pos, vec in chunk.vectors]))
        self.current, self.last_comma = Chunk(), -1

    def move_after_comma(self) -> None:
        """Close the chunk after its last comma; the tokens behind the comma open the next chunk."""
        cut, chunk = self.last_comma + 1, self.current
        moved = Chunk(chunk.tokens[cut:], chunk.weights[cut:], [(p - cut, v) for p, v in chunk.vectors if p >= cut])
        self.current = Chunk(chunk.tokens[:cut], chunk.weights[:cut], [(p, v) for p, v in chunk.vectors if p < cut])
        self.close()
        self.current = moved

    def add(self, ids: Sequence[int], weight: float, find: Optional[EmbeddingFinder]) -> None:
        """Append the tokens of one fragment of weight ``weight``."""
        spec, position = self.spec, 0
        while position < len(ids):
            token, full = ids[position], len(self.current.tokens) == spec.length
            if token == spec.comma:
                self.last_comma = len(self.current.tokens)
            elif (full and spec.backtrack and self.last_comma >= 0
                  and spec.length - self.last_comma <= spec.backtrack):
                self.move_after_comma()
            if len(self.current.tokens) == spec.length:
                self.close()
            found = find(ids, position) if find is not None else None
            if found is None:
                self.current.tokens.append(token)
                self.current.weights.append(weight)
                position += 1
                continue
            vectors, n_ids = found
            if len(vectors) > spec.length:
                raise ValueError(f"a textual-inversion embedding of {len(vectors)} vectors does not fit into "
                                 f"a chunk of {spec.length} tokens")
            if len(self.current.tokens) + len(vectors) > spec.length:
                self.close()
            self.current.vectors.append((len(self.current.tokens), vectors))
            self.current.tokens += [0] * len(vectors)
            self.current.weights += [weight] * len(vectors)
            position += n_ids


def split_into_chunks(pieces: Sequence[tuple[Sequence[int], Optional[float]]], spec: ChunkSpec,
                      find: Optional[EmbeddingFinder] = None) -> list[Chunk]:
    """Chunks of ``spec.length + 2`` tokens from ``[(token ids, weight)]``; weight None is a BREAK."""
    builder = _ChunkBuilder(spec)
    for ids, weight in pieces:
        if weight is None:
            builder.close()
        else:
            builder.add(ids, weight, find)
    if builder.current.tokens or not builder.chunks:
        builder.close()
    return builder.chunks


def prompt_chunks(prompt: str, bpe: Callable[[str], list[int]], spec: ChunkSpec,
                  find: Optional[EmbeddingFinder] = None) -> list[Chunk]:
    """The chunks of one prompt in web-UI syntax, each fragment tokenized by ``bpe`` (ids without start/end)."""
    pieces = [(bpe(text) if weight is not None else [], weight) for text, weight in parse_weighted_prompt(prompt)]
    return split_into_chunks(pieces, spec, find)


def empty_chunk(spec: ChunkSpec) -> Chunk:
    """The chunk of an empty prompt (pads prompts that have fewer chunks than others in a batch)."""
    return split_into_chunks([], spec)[0]


class ChunkEncoder(Protocol):
    """What ``encode_chunks`` needs from a text encoder."""

    def encode_tokens(self, tokens: torch.Tensor, vectors: Optional[list[list[Placed]]] = None) -> torch.Tensor:
        """Token ids [N, L] (and embedding vectors per row) -> features [N, L, width]."""


def apply_weights(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply features [N, L, D] by weights [N, L] and rescale each row to its former mean (rows of 1s untouched)."""
    changed = (weights != 1.0).any(dim=1)
    if not bool(changed.any()):
        return z
    mean = z.mean(dim=(1, 2), keepdim=True)
    weighted = z * weights.to(device=z.device, dtype=z.dtype)[..., None]
    weighted = weighted * (mean / weighted.mean(dim=(1, 2), keepdim=True))
    return torch.where(changed.to(z.device)[:, None, None], weighted, z)


def encode_chunks(encoder: ChunkEncoder, batch: Sequence[list[Chunk]], spec: ChunkSpec) -> torch.Tensor:
    """Features [B, k * (length + 2), width] of B chunked prompts, all padded to the largest chunk count k."""
    count = max(len(chunks) for chunks in batch)
    rows = [chunk for chunks in batch for chunk in list(chunks) + [empty_chunk(spec)] * (count - len(chunks))]
    tokens = torch.tensor([chunk.tokens for chunk in rows], dtype=torch.long)
    vectors = [chunk.vectors for chunk in rows]
    z = encoder.encode_tokens(tokens, vectors if any(vectors) else None)
    z = apply_weights(z, torch.tensor([chunk.weights for chunk in rows], dtype=torch.float32))
    return z.reshape(len(batch), count * z.shape[1], z.shape[2])


def place_vectors(embeds: torch.Tensor, vectors: Optional[list[list[Placed]]]) -> torch.Tensor:
    """Token embeddings [N, L, D] with each row's textual-inversion vectors written at their positions (a copy)."""
    if not vectors or not any(vectors):
        return embeds
    embeds = embeds.clone()
    for row, placed in enumerate(vectors):
        for position, vec in placed:
            embeds[row, position:position + vec.shape[0]] = vec.to(device=embeds.device, dtype=embeds.dtype)
    return embeds

"""CLIP BPE tokenization for both text encoders (open_clip's vocabulary; no download).

SD2 uses ``open_clip.tokenize`` as is (0-padded). SD1 used transformers' ``CLIPTokenizer``, which
gives the same BPE ids but cleans text slightly differently (ftfy + whitespace, no extra HTML
unescaping) and pads with the end-of-text token; ``sd1_tokenize`` reproduces that.
"""
from __future__ import annotations

import re
from typing import Sequence, Union

import torch

SOT_TOKEN = 49406
EOT_TOKEN = 49407
COMMA_TOKEN = 267  # ",</w>"

Prompts = Union[str, Sequence[str]]


def as_list(text: Prompts) -> list[str]:
    """A single prompt or a sequence of prompts as a list."""
    return [text] if isinstance(text, str) else list(text)


def _bpe():
    """open_clip's ``SimpleTokenizer`` instance (vocabulary bundled with open_clip)."""
    from open_clip import tokenizer as oc_tokenizer

    return oc_tokenizer._tokenizer


def _hf_clean(text: str) -> str:
    """transformers' CLIPTokenizer cleaning: ftfy fix, collapse whitespace, lower case."""
    import ftfy

    return re.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()


_HF_SPECIAL = {"<|startoftext|>": SOT_TOKEN, "<|endoftext|>": EOT_TOKEN}
_HF_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def word_pieces(text: str, flavor: str = "hf") -> tuple[str, list[tuple[int, list[int]]]]:
    """(cleaned text, [(start of each pre-token, its BPE ids)]) under the ``hf`` (SD1) or ``open_clip`` (SD2) rules."""
    import regex

    bpe = _bpe()
    if flavor == "hf":
        cleaned = _hf_clean(text)
        matches = regex.finditer(_HF_PATTERN, cleaned, regex.IGNORECASE)
    elif flavor == "open_clip":
        cleaned = bpe.clean_fn(text)
        matches = bpe.pat.finditer(cleaned)
    else:
        raise ValueError(f"unknown tokenizer flavor '{flavor}' (use 'hf' or 'open_clip')")
    pieces = []
    for match in matches:
        token = match.group()
        if flavor == "hf" and token in _HF_SPECIAL:
            pieces.append((match.start(), [_HF_SPECIAL[token]]))
            continue
        token = "".join(bpe.byte_encoder[b] for b in token.encode("utf-8"))
        pieces.append((match.start(), [bpe.encoder[piece] for piece in bpe.bpe(token).split(" ")]))
    return cleaned, pieces


def hf_bpe_ids(text: str) -> list[int]:
    """BPE ids of ``text`` as transformers' CLIPTokenizer produces them (without SOT/EOT)."""
    return [i for _, ids in word_pieces(text, "hf")[1] for i in ids]


def open_clip_bpe_ids(text: str) -> list[int]:
    """BPE ids of ``text`` as ``open_clip.tokenize`` produces them (without SOT/EOT)."""
    return _bpe().encode(text)


def sd1_tokenize(text: Prompts, max_length: int = 77) -> torch.Tensor:
    """SD1 tokens [B, max_length] int64: SOT + at most max_length-2 BPE ids + EOT, padded with EOT."""
    prompts = as_list(text)
    tokens = torch.full((len(prompts), max_length), EOT_TOKEN, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids = [SOT_TOKEN] + hf_bpe_ids(prompt)[: max_length - 2] + [EOT_TOKEN]
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens


def open_clip_tokenize(text: Prompts, context_length: int = 77) -> torch.Tensor:
    """SD2 tokens [B, context_length] int64 from ``open_clip.tokenize`` (0-padded, last token EOT if cut)."""
    import open_clip

    return open_clip.tokenize(as_list(text), context_length=context_length)


def truncated_text(text: str, max_length: int, flavor: str = "hf") -> str:
    """The (cleaned) end of ``text`` that does not fit into ``max_length`` tokens with SOT and EOT; '' if none.

    A word cut in the middle counts as dropped.
    """
    cleaned, pieces = word_pieces(text, flavor)
    room = max(max_length - 2, 0)
    for start, ids in pieces:
        room -= len(ids)
        if room < 0:  # back up to the start of the space-separated word
            return cleaned[cleaned.rfind(" ", 0, start) + 1:].strip()
    return ""

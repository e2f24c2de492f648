"""Prompt emphasis in the AUTOMATIC1111 web UI's syntax: ``(text)``, ``[text]``, ``(text:1.5)``, escapes, ``BREAK``.

``parse_weighted_prompt`` turns a prompt into fragments ``(text, weight)``; a ``BREAK`` keyword becomes the
fragment ``(BREAK, None)`` (start a new 75-token chunk). The rules follow the web UI's ``parse_prompt_attention``:

* ``(x)`` multiplies the weight of ``x`` by 1.1, ``[x]`` divides it by 1.1, ``(x:w)`` multiplies it by ``w``;
  brackets nest (``((x))`` is 1.21) and brackets left open at the end still apply to the text after them.
* ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are the literal characters; a lone backslash before anything else is
  dropped. A closing bracket without an opening one is literal text, and so is a ``:`` outside ``(x:w)``.
* Neighbouring fragments of equal weight are merged; an empty prompt is ``[("", 1.0)]``.

Two deliberate differences: ``BREAK`` inside brackets still breaks the chunk (the web UI turns it into the literal
word with a negative weight there), and ``(x:1.2.3)`` (not a number) is literal text instead of an error.
"""
from __future__ import annotations

import re
from typing import Optional

BREAK = "BREAK"
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

Fragment = tuple[str, Optional[float]]  # (text, weight); weight None marks a BREAK

_TOKEN = re.compile(r"""
    \\[()\[\]\\]        # escaped bracket or backslash
  | \\                  # lone backslash
  | \( | \[            # opening brackets
  | :([+-]?[.\d]+)\)    # explicit weight closing a round bracket
  | \) | ]              # closing brackets
  | [^\\()\[\]:]+       # plain text
  | :                   # a colon that is not a weight
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def _number(text: Optional[str]) -> Optional[float]:
    """``float(text)``, or None when ``text`` is None or not a number (``1.2.3``)."""
    if text is None:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _scale(parts: list[list], start: int, factor: float) -> None:
    """Multiply the weights of ``parts[start:]`` by ``factor`` (BREAK markers keep None)."""
    for part in parts[start:]:
        if part[1] is not None:
            part[1] *= factor


def _add_text(parts: list[list], text: str) -> None:
    """Append plain text, splitting it at ``BREAK`` keywords."""
    for i, piece in enumerate(_BREAK.split(text)):
        if i:
            parts.append([BREAK, None])
        parts.append([piece, 1.0])


def _merge(parts: list[list]) -> list[Fragment]:
    """Join neighbouring fragments of equal weight (BREAK markers stay apart)."""
    merged: list[list] = []
    for text, weight in parts:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def parse_weighted_prompt(prompt: str) -> list[Fragment]:
    """Fragments ``[(text, weight)]`` of ``prompt`` in web-UI emphasis syntax; ``(BREAK, None)`` marks a BREAK."""
    parts: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []
    for match in _TOKEN.finditer(prompt):
        token, weight = match.group(0), _number(match.group(1))
        if token.startswith("\\"):
            parts.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(parts))
        elif token == "[":
            square_open.append(len(parts))
        elif weight is not None and round_open:
            _scale(parts, round_open.pop(), weight)
        elif token == ")" and round_open:
            _scale(parts, round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            _scale(parts, square_open.pop(), SQUARE_MULTIPLIER)
        else:
            _add_text(parts, token)
    for start in round_open:
        _scale(parts, start, ROUND_MULTIPLIER)
    for start in square_open:
        _scale(parts, start, SQUARE_MULTIPLIER)
    return _merge(parts) if parts else [("", 1.0)]


def has_weights(fragments: list[Fragment]) -> bool:
    """True when some fragment's weight differs from 1 (BREAKs do not count)."""
    return any(weight is not None and weight != 1.0 for _, weight in fragments)

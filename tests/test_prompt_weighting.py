"""Prompt emphasis parser: the web UI's (text, weight) pairs for known prompts (its parse_prompt_attention rules)."""
from __future__ import annotations

import pytest

from ldm.modules.encoders.prompt_weighting import BREAK, has_weights, parse_weighted_prompt


def close(got, want):
    """Same texts, weights equal up to float rounding (BREAK weights None)."""
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, g), (_, w) in zip(got, want):
        assert (g is None and w is None) or g == pytest.approx(w, rel=1e-12)


@pytest.mark.parametrize("prompt, want", [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("((text))", [("text", 1.1 * 1.1)]),
    ("[text]", [("text", 1 / 1.1)]),
    ("[[text]]", [("text", 1 / 1.1 / 1.1)]),
    ("(text:1.5)", [("text", 1.5)]),
    ("(text: 0.5)", [("text: 0.5", 1.1)]),  # a space before the number is text, as in the web UI
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("[unbalanced", [("unbalanced", 1 / 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("a \\\\ b", [("a \\ b", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash is dropped
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("closing) only] here", [("closing) only] here", 1.0)]),
    ("a: b", [("a: b", 1.0)]),
    ("(x:-1)", [("x", -1.0)]),
    ("(x:1.2.3)", [("x:1.2.3)", 1.1)]),
    ("", [("", 1.0)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1 ** 4), (".", 1.1)]),
    ("(a [b (c:2)] d)", [("a ", 1.1), ("b ", 1.0), ("c", 2.0), (" d", 1.1)]),
])
def test_known_prompts(prompt, want):
    close(parse_weighted_prompt(prompt), want)


@pytest.mark.parametrize("prompt, want", [
    ("a BREAK b", [("a", 1.0), (BREAK, None), ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), (BREAK, None), ("b", 1.0)]),
    ("a BREAK BREAK b", [("a", 1.0), (BREAK, None), ("", 1.0), (BREAK, None), ("b", 1.0)]),
    ("BREAK a", [("", 1.0), (BREAK, None), ("a", 1.0)]),
    ("BREAKFAST, Break", [("BREAKFAST, Break", 1.0)]),  # only the whole upper-case word
    ("(a BREAK b)", [("a", 1.1), (BREAK, None), ("b", 1.1)]),  # ours: still a break inside brackets
])
def test_break(prompt, want):
    close(parse_weighted_prompt(prompt), want)


def test_has_weights():
    assert not has_weights(parse_weighted_prompt("a photo, of a cat: BREAK sitting \\(on a mat\\)"))
    assert has_weights(parse_weighted_prompt("a (cat)"))
    assert not has_weights(parse_weighted_prompt("a (cat:1.0)"))

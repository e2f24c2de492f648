"""Long and weighted prompts: web-UI chunk boundaries and token ids, and the encodings of both text encoders.

The expected chunks follow the web UI's ``tokenize_line`` (75 tokens, comma backtrack within 20 tokens, BREAK,
end-token padding; SD 2 pads with 0 after the first end token) on prompts whose token ids are known.
"""
from __future__ import annotations

import json

import pytest
import torch

from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.prompt_chunks import ChunkSpec, apply_weights, empty_chunk, prompt_chunks
from ldm.modules.encoders.tokenizer import (COMMA_TOKEN, EOT_TOKEN, SOT_TOKEN, _bpe, hf_bpe_ids, open_clip_tokenize,
                                            sd1_tokenize)
from conftest import REFERENCE
from test_encoders import tiny_hf

RED, BLUE, A, CIRCLE = 736, 1746, 320, 7117  # "red", "blue", "a", "circle": one BPE id each
SD1 = ChunkSpec(SOT_TOKEN, EOT_TOKEN, EOT_TOKEN, COMMA_TOKEN)
SD2 = ChunkSpec(SOT_TOKEN, EOT_TOKEN, 0, COMMA_TOKEN)


def chunk(*ids: int, spec: ChunkSpec = SD1) -> list[int]:
    """Start, ids, end and padding: one 77-token chunk as the web UI builds it."""
    tokens = [SOT_TOKEN, *ids, EOT_TOKEN]
    return tokens + [spec.pad] * (77 - len(tokens))


def chunks_of(prompt: str, spec: ChunkSpec = SD1) -> list[list[int]]:
    return [c.tokens for c in prompt_chunks(prompt, hf_bpe_ids, spec)]


def words(word: str, n: int) -> str:
    return " ".join([word] * n)


def test_token_constants_match_the_vocabulary():
    assert _bpe().encoder[",</w>"] == COMMA_TOKEN
    assert hf_bpe_ids("red blue a circle") == [RED, BLUE, A, CIRCLE]


def test_short_prompts_give_todays_tokens():
    for prompt in ["a red circle", "", "a photo, of a cat: on a mat", words("red", 75)]:
        assert torch.equal(torch.tensor(chunks_of(prompt)), sd1_tokenize([prompt]))
        assert torch.equal(torch.tensor(chunks_of(prompt, SD2)), open_clip_tokenize([prompt]))


def test_76_tokens_make_two_chunks():
    assert chunks_of(words("red", 76)) == [chunk(*[RED] * 75), chunk(RED)]
    assert chunks_of(words("red", 150)) == [chunk(*[RED] * 75), chunk(*[RED] * 75)]
    assert len(chunks_of(words("red", 151))) == 3


@pytest.mark.parametrize("before, moves", [(60, True), (55, True), (54, False), (50, False)])
def test_comma_backtrack_within_20_tokens(before, moves):
    """A full chunk whose last comma lies at most 20 tokens back ends after that comma."""
    got = chunks_of(f"{words('red', before)}, {words('blue', 30)}")
    if moves:  # the comma at index `before` ends the chunk; the blues after it open the next one
        assert got == [chunk(*[RED] * before, COMMA_TOKEN), chunk(*[BLUE] * 30)]
    else:
        fits = 75 - before - 1
        assert got == [chunk(*[RED] * before, COMMA_TOKEN, *[BLUE] * fits), chunk(*[BLUE] * (30 - fits))]


def test_comma_as_76th_token_opens_the_next_chunk():
    assert chunks_of(f"{words('red', 75)}, blue") == [chunk(*[RED] * 75), chunk(COMMA_TOKEN, BLUE)]


def test_break_starts_a_new_chunk():
    assert chunks_of("a red BREAK blue circle") == [chunk(A, RED), chunk(BLUE, CIRCLE)]
    assert chunks_of("BREAK red") == [chunk(), chunk(RED)]  # as the web UI: a leading BREAK gives an empty chunk
    assert chunks_of("red BREAK") == [chunk(RED)]
    assert chunks_of("red BREAK blue", SD2) == [chunk(RED, spec=SD2), chunk(BLUE, spec=SD2)]


def test_weights_follow_their_tokens_across_chunks():
    chunks = prompt_chunks(f"a (red:1.5) [circle], {words('blue', 71)} (red)", hf_bpe_ids, SD1)
    first, second = chunks
    assert first.tokens == chunk(A, RED, CIRCLE, COMMA_TOKEN, *[BLUE] * 71)
    assert first.weights[:5] == [1.0, 1.0, 1.5, pytest.approx(1 / 1.1), 1.0] and set(first.weights[5:]) == {1.0}
    assert second.tokens == chunk(RED) and second.weights[:3] == [1.0, pytest.approx(1.1), 1.0]
    assert len(first.weights) == len(second.weights) == 77


def test_backtracked_tokens_keep_their_weights():
    first, second = prompt_chunks(f"{words('red', 60)}, ({words('blue', 20)}:2)", hf_bpe_ids, SD1)
    assert second.tokens == chunk(*[BLUE] * 20)
    assert second.weights == [1.0] + [2.0] * 20 + [1.0] * 56 and set(first.weights) == {1.0}


def test_empty_chunk_is_the_empty_prompt():
    assert empty_chunk(SD1).tokens == chunk() == sd1_tokenize([""])[0].tolist()
    assert empty_chunk(SD2).tokens == chunk(spec=SD2) == open_clip_tokenize([""])[0].tolist()


@pytest.fixture(scope="module")
def encoders() -> dict:
    """Tiny SD 1 (reference weights) and SD 2 (seeded random weights) text encoders of width 32."""
    if not (REFERENCE / "cases.json").exists():
        pytest.skip("../shared/reference is not present")
    torch.manual_seed(0)
    open_cfg = json.loads((REFERENCE / "SD-Tiny-Text-32.json").read_text())
    sd2 = FrozenOpenCLIPEmbedder(version=None, arch_config=open_cfg, layer="penultimate")
    with torch.no_grad():  # a fresh ln_final has mean-0 outputs, which the mean rescaling cannot keep
        sd2.model.ln_final.bias.normal_(0.2, 0.5)
    return {"sd1": tiny_hf(REFERENCE), "sd2": sd2}


PLAIN = ["a red circle on a blue background", "", "a photo, of a cat: on a mat", words("red", 75), "x"]


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_unweighted_short_prompts_are_bit_identical(encoders, name):
    enc = encoders[name]
    with torch.no_grad():
        assert torch.equal(enc.encode_prompts(PLAIN), enc.encode(PLAIN))
        assert torch.equal(enc.encode_prompts(PLAIN[0]), enc.encode(PLAIN[0]))


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_long_prompt_is_its_chunks_encoded_and_concatenated(encoders, name):
    enc = encoders[name]
    first, rest = words("red", 60) + ",", words("blue", 30)
    with torch.no_grad():
        z = enc.encode_prompts(f"{first} {rest}")
        want = enc.encode([first, rest])
    assert z.shape == (1, 154, 32)
    assert torch.equal(z[0], torch.cat([want[0], want[1]]))


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_batch_is_padded_with_empty_prompt_chunks(encoders, name):
    enc = encoders[name]
    with torch.no_grad():
        z = enc.encode_prompts(["red BREAK blue BREAK a circle", "a circle"])
        want = enc.encode(["red", "blue", "a circle", "a circle", "", ""])
    assert z.shape == (2, 231, 32)
    torch.testing.assert_close(z[0], torch.cat([want[0], want[1], want[2]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(z[1], torch.cat([want[3], want[4], want[5]]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_weights_scale_tokens_and_keep_the_chunk_mean(encoders, name):
    enc = encoders[name]
    with torch.no_grad():
        z = enc.encode_prompts(["a (red:1.5) [circle]", "a red circle"])
        plain = enc.encode(["a red circle"] * 2)[0]  # the same token batch as the weighted call
    weights = torch.ones(77)
    weights[2], weights[3] = 1.5, 1 / 1.1
    weighted = plain * weights[:, None]
    want = weighted * (plain.mean() / weighted.mean())
    torch.testing.assert_close(z[0], want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(z[0].mean(), plain.mean(), atol=1e-6, rtol=1e-6)
    assert torch.equal(z[1], plain)  # another prompt of the batch is not touched
    assert not torch.allclose(z[0], plain)


def test_apply_weights_rows_of_ones_are_untouched_and_dtype_follows():
    z = torch.randn(3, 77, 8, dtype=torch.float64)
    weights = torch.ones(3, 77)
    weights[1, 5] = 2.0
    out = apply_weights(z, weights)
    assert out.dtype == torch.float64
    assert torch.equal(out[0], z[0]) and torch.equal(out[2], z[2])
    assert out[1, 5, 0] / z[1, 5, 0] == pytest.approx(2 * out[1, 0, 0] / z[1, 0, 0])
    assert apply_weights(z, torch.ones(3, 77)) is z


def test_pooled_layer_keeps_the_plain_encoding(reference_dir):
    pooled = FrozenCLIPEmbedder(version=str(reference_dir / "hf_clip_text"), layer="pooled")
    assert not pooled.supports_prompt_chunks
    with torch.no_grad():
        assert torch.equal(pooled.encode_prompts(["a cat"]), pooled.encode(["a cat"]))


def test_hidden_layer_and_autocast(reference_dir):
    from test_encoders import cond_stage_weights

    hidden = FrozenCLIPEmbedder(version=str(reference_dir / "hf_clip_text"), layer="hidden", layer_idx=-2)
    hidden.load_state_dict(cond_stage_weights(reference_dir, "ldm_v1.weights.safetensors"), strict=True)
    with torch.no_grad():
        assert torch.equal(hidden.encode_prompts(PLAIN), hidden.encode(PLAIN))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = hidden.encode_prompts([f"(a red:1.3) circle, {words('blue', 80)}", "x"])
    assert z.shape == (2, 154, 32) and torch.isfinite(z).all()

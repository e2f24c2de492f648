"""Textual-inversion embeddings: web-UI / diffusers file formats, safe loading, placement in chunks, encoding."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import REFERENCE
from ldm.modules.encoders import textual_inversion as ti
from ldm.modules.encoders.modules import FrozenOpenCLIPEmbedder
from ldm.modules.encoders.prompt_chunks import ChunkSpec, prompt_chunks
from ldm.modules.encoders.tokenizer import COMMA_TOKEN, EOT_TOKEN, SOT_TOKEN, hf_bpe_ids
from test_encoders import tiny_hf
from tiny_model import load_script, model_args, pixels, samples, write_tiny_model

txt2img = load_script("txt2img")
RED, CIRCLE, A = 736, 7117, 320
SPEC = ChunkSpec(SOT_TOKEN, EOT_TOKEN, EOT_TOKEN, COMMA_TOKEN)


def webui_pt(path: Path, vectors: torch.Tensor) -> Path:
    """An embedding as the web UI saves it (torch.save of a dict with string_to_param)."""
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors.clone().requires_grad_(True)},
                "name": path.stem, "step": 500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "sd15"}, path)
    return path


def test_reads_the_three_formats(tmp_path: Path):
    vectors = torch.randn(3, 32)
    webui_pt(tmp_path / "a.pt", vectors)
    save_file({"emb_params": vectors}, str(tmp_path / "b.safetensors"))
    torch.save({"<cat-toy>": vectors[0]}, tmp_path / "c.bin")  # diffusers concept: one 1-D tensor
    assert torch.equal(ti.read_embedding(tmp_path / "a.pt"), vectors)
    assert torch.equal(ti.read_embedding(tmp_path / "b.safetensors"), vectors)
    assert torch.equal(ti.read_embedding(tmp_path / "c.bin"), vectors[:1])
    torch.save({"string_to_param": {"*": torch.nn.Parameter(vectors)}, "name": "d"}, tmp_path / "d.pt")  # older UI
    assert torch.equal(ti.read_embedding(tmp_path / "d.pt"), vectors)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_bad_files_are_clear_errors_and_never_run_code(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"string_to_param": {"*": _Boom()}}, protocol=2))
    with pytest.raises(ti.EmbeddingError, match="refusing to load|cannot read"):
        ti.read_embedding(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()
    save_file({"emb_params": torch.randn(2, 32)}, str(tmp_path / "cut.safetensors"))
    data = (tmp_path / "cut.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 40])
    with pytest.raises(ti.EmbeddingError, match="cut.safetensors"):
        ti.read_embedding(tmp_path / "cut.safetensors")
    torch.save({"string_to_param": {"*": torch.randn(2, 32), "+": torch.randn(2, 32)}}, tmp_path / "two.pt")
    with pytest.raises(ti.EmbeddingError, match="exactly one term"):
        ti.read_embedding(tmp_path / "two.pt")
    save_file({"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)}, str(tmp_path / "xl.safetensors"))
    with pytest.raises(ti.EmbeddingError, match="SDXL"):
        ti.read_embedding(tmp_path / "xl.safetensors")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(ti.EmbeddingError, match="empty"):
        ti.read_embedding(tmp_path / "empty.pt")


def test_names_become_vectors_in_chunks(tmp_path: Path):
    webui_pt(tmp_path / "my-style.pt", torch.randn(2, 32))
    library = ti.EmbeddingLibrary(tmp_path)
    find = library.finder(hf_bpe_ids, 32)
    chunk, = prompt_chunks("a (my-style:1.2), red", hf_bpe_ids, SPEC, find)
    assert chunk.tokens[:6] == [SOT_TOKEN, A, 0, 0, COMMA_TOKEN, RED] and chunk.tokens[6] == EOT_TOKEN
    assert chunk.weights[:6] == [1.0, 1.0, 1.2, 1.2, 1.0, 1.0]
    (position, vectors), = chunk.vectors
    assert position == 2 and torch.equal(vectors, library.vectors("my-style", 32))


def test_an_embedding_for_another_family_is_a_clear_error(tmp_path: Path):
    webui_pt(tmp_path / "sd1-thing.pt", torch.randn(1, 768))
    library = ti.EmbeddingLibrary(tmp_path)
    with pytest.raises(ti.EmbeddingError, match=r"'sd1-thing'.*768 wide, SD 1.*1024 wide, SD 2"):
        prompt_chunks("a sd1-thing", hf_bpe_ids, SPEC, library.finder(hf_bpe_ids, 1024))


def test_an_embedding_that_does_not_fit_moves_to_the_next_chunk(tmp_path: Path):
    webui_pt(tmp_path / "wide.pt", torch.randn(4, 32))
    find = ti.EmbeddingLibrary(tmp_path).finder(hf_bpe_ids, 32)
    first, second = prompt_chunks(" ".join(["red"] * 73) + " wide", hf_bpe_ids, SPEC, find)
    assert first.tokens[1:76] == [RED] * 73 + [EOT_TOKEN] * 2 and not first.vectors
    assert second.tokens[:6] == [SOT_TOKEN, 0, 0, 0, 0, EOT_TOKEN] and second.vectors[0][0] == 1


def test_unused_broken_files_do_no_harm(tmp_path: Path):
    (tmp_path / "broken.pt").write_bytes(b"not a pickle at all")
    library = ti.EmbeddingLibrary(tmp_path)
    chunk, = prompt_chunks("a red circle", hf_bpe_ids, SPEC, library.finder(hf_bpe_ids, 32))
    assert not chunk.vectors
    with pytest.raises(ti.EmbeddingError, match="broken.pt"):
        prompt_chunks("a broken circle", hf_bpe_ids, SPEC, library.finder(hf_bpe_ids, 32))


def encoders() -> dict:
    if not (REFERENCE / "cases.json").exists():
        pytest.skip("../shared/reference is not present")
    torch.manual_seed(0)
    cfg = json.loads((REFERENCE / "SD-Tiny-Text-32.json").read_text())
    sd2 = FrozenOpenCLIPEmbedder(version=None, arch_config=cfg, layer="penultimate")
    return {"sd1": tiny_hf(REFERENCE), "sd2": sd2}


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_embedding_of_word_vectors_encodes_like_the_words(name, tmp_path: Path):
    """An embedding holding the token embeddings of 'red circle' must encode exactly as those words."""
    enc = encoders()[name]
    table = enc.model.token_embedding if name == "sd2" else enc.transformer.text_model.embeddings.token_embedding
    save_file({"emb_params": table.weight[[RED, CIRCLE]].detach().clone()}, str(tmp_path / "rc.safetensors"))
    library = ti.EmbeddingLibrary(tmp_path)
    with torch.no_grad():
        got = enc.encode_prompts(["a rc on blue", "a (rc:1.3)"], library)
        want = enc.encode_prompts(["a red circle on blue", "a (red circle:1.3)"])
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(enc.encode_prompts("a rc"), enc.encode_prompts("a rc", library))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    return write_tiny_model(tmp_path_factory.mktemp("tiny"))


def test_txt2img_uses_embeddings_from_the_folder_and_refuses_bad_ones(tiny, tmp_path: Path, monkeypatch, capsys):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    monkeypatch.setattr(ti, "DEFAULT_EMBEDDINGS_DIR", folder)
    args = [*model_args(tiny), "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--seed", "5"]
    assert txt2img.main([*args, "--outdir", str(tmp_path / "a"), "--prompt", "a shiny circle"]) == 0
    webui_pt(folder / "shiny.pt", torch.randn(2, 32))
    assert txt2img.main([*args, "--outdir", str(tmp_path / "b"), "--prompt", "a shiny circle"]) == 0
    assert not np.array_equal(pixels(samples(tmp_path / "a")[0]), pixels(samples(tmp_path / "b")[0]))
    webui_pt(folder / "sd2-style.pt", torch.randn(2, 1024))
    assert txt2img.main([*args, "--outdir", str(tmp_path / "c"), "--prompt", "x",
                         "--negative_prompt", "sd2-style"]) == 2
    err = capsys.readouterr().err
    assert "sd2-style" in err and "1024 wide, SD 2" in err and "Traceback" not in err
    assert not (tmp_path / "c" / "samples").exists() or not samples(tmp_path / "c")


def test_negative_prompt_embeddings(tiny, tmp_path: Path, monkeypatch):
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config
    from ldm.inference import pipeline

    monkeypatch.setattr(ti, "DEFAULT_EMBEDDINGS_DIR", tmp_path)
    model = load_model_from_config(OmegaConf.load(tiny[0]), tiny[1])
    job = pipeline.Job(("a circle",), (0,))
    with torch.no_grad():
        _, before = pipeline.conditioning(model, job, "bad-hands", 7.5, set())
        webui_pt(tmp_path / "bad-hands.pt", torch.randn(3, 32))
        _, after = pipeline.conditioning(model, job, "bad-hands", 7.5, set())
    assert before.shape == after.shape and not torch.allclose(before, after)


def test_safetensors_wins_a_shared_name_with_one_warning(tmp_path: Path, caplog):
    webui_pt(tmp_path / "dup.pt", torch.zeros(1, 32))
    save_file({"emb_params": torch.ones(2, 32)}, str(tmp_path / "dup.safetensors"))
    library = ti.EmbeddingLibrary(tmp_path)
    for _ in range(2):
        chunk, = prompt_chunks("a dup", hf_bpe_ids, SPEC, library.finder(hf_bpe_ids, 32))
    assert torch.equal(chunk.vectors[0][1], torch.ones(2, 32))
    assert len([r for r in caplog.records if "share the name" in r.getMessage()]) == 1


def test_conditioning_turns_a_bad_embedding_into_a_usage_error(tiny, tmp_path: Path, monkeypatch):
    from omegaconf import OmegaConf

    from ldm.checkpoint import load_model_from_config
    from ldm.inference import pipeline
    from ldm.inference.errors import UsageError

    monkeypatch.setattr(ti, "DEFAULT_EMBEDDINGS_DIR", tmp_path)
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    model = load_model_from_config(OmegaConf.load(tiny[0]), tiny[1])
    with pytest.raises(UsageError, match="cut.pt"), torch.no_grad():
        pipeline.conditioning(model, pipeline.Job(("a cut circle",), (0,)), "", 7.5, set())

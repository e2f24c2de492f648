"""Speed options (ldm.inference.accel) and the pipeline's work savings: CPU behaviour, and the fast path on CUDA."""
from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from ldm.inference import accel, pipeline
from ldm.inference.args import parse_options
from ldm.util import instantiate_from_config
from tiny_model import tiny_config

GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    import json

    from tiny_model import TEXT_CONFIG

    folder = tmp_path_factory.mktemp("text")
    (folder / "config.json").write_text(json.dumps(TEXT_CONFIG), encoding="utf-8")
    return folder


def tiny_model(text_dir, device: str = "cpu") -> torch.nn.Module:
    """The tiny SD1-style LatentDiffusion of the script tests, random weights, eval mode."""
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.create(tiny_config(text_dir)).model)
    with torch.no_grad():
        for param in model.model.parameters():  # the zero-initialised output layers would hide the UNet
            if param.dim() > 1 and not param.abs().sum():
                param.normal_(0.0, 0.02)
    return model.to(device).eval().requires_grad_(False)


def unet_out(model: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """One UNet call on fixed inputs (device of the model)."""
    device = accel.model_device(model)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 16, 16, generator=g).to(device)
    c = torch.randn(2, 77, 32, generator=g).to(device)
    with torch.no_grad():
        return model.apply_model(x, torch.tensor([10, 900], device=device), c).float()


def test_defaults_change_nothing(text_dir):
    model = tiny_model(text_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert accel.apply_fast_path(model, accel.FastPath()) == []
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert accel.apply_options(model, parse_options(["--device", "cpu"], "txt2img")) == []
    assert model.first_stage_model.tile_size is None


def test_cuda_techniques_are_skipped_on_the_cpu(text_dir, caplog):
    model = tiny_model(text_dir)
    reference = unet_out(model)
    with caplog.at_level(logging.INFO, logger="ldm.inference.accel"):
        done = accel.apply_fast_path(model, accel.FastPath.cuda(compile_mode="reduce-overhead"))
    assert len(done) == 1 and done[0].startswith("attention sdpa (")
    assert "skipped (CUDA only" in caplog.text
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert not any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                   for p in model.parameters())
    torch.testing.assert_close(unet_out(model), reference)


def test_flags_on_the_cpu_warn_and_keep_the_model(text_dir, caplog):
    model = tiny_model(text_dir)
    opts = parse_options(["--device", "cpu", "--fast", "--compile", "default", "--tiled_vae", "8"], "txt2img")
    with caplog.at_level(logging.WARNING):
        done = accel.apply_options(model, opts)
    assert "CUDA GPUs only" in caplog.text
    assert done == ["tiled VAE (8 latent cells per tile)"] and model.first_stage_model.tile_size == 8
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_threads_option_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        assert accel.apply_options(torch.nn.Linear(1, 1), SimpleNamespace(threads=1)) == ["1 CPU threads"]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert accel.sensible_threads(3) == 3
    with pytest.raises(ValueError, match="at least 1"):
        accel.sensible_threads(0)


@pytest.mark.parametrize("cores,load,threads", [(2, 0.1, 2), (2, 1.2, 1), (2, 3.5, 1), (16, 4.4, 12)])
def test_default_threads_leave_busy_cores_alone(monkeypatch, cores, load, threads):
    monkeypatch.setattr(accel, "usable_cores", lambda: cores)
    monkeypatch.setattr(accel, "busy_cores", lambda: load)
    assert accel.sensible_threads() == threads


def test_cast_and_channels_last_keep_keys_schedule_and_results(text_dir):
    model = tiny_model(text_dir)
    reference, keys = unet_out(model), list(model.state_dict())
    assert accel.cast_weights(model, torch.bfloat16) == ["unet weights bfloat16", "vae weights bfloat16",
                                                         "text weights bfloat16"]
    accel.to_channels_last(model)
    assert model.alphas_cumprod.dtype == torch.float32 and list(model.state_dict()) == keys
    conv = model.model.diffusion_model.input_blocks[0][0].weight
    assert conv.dtype == torch.bfloat16 and conv.is_contiguous(memory_format=torch.channels_last)
    out = unet_out(model)  # the UNet computes in its weights' dtype and answers in the input's
    assert out.dtype == torch.float32
    assert float((out - reference).abs().max()) < 0.05 * float(reference.abs().max())
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        accel.cast_weights(model, torch.int8)


@pytest.mark.slow
def test_compile_keeps_state_dict_keys_and_outputs(text_dir):
    model = tiny_model(text_dir)
    reference, keys = unet_out(model), list(model.state_dict())
    done = accel.compile_parts(model, unet=True, vae=True, backend="eager")
    assert done == ["unet compiled (eager)", "vae decoder compiled (eager)"]
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(unet_out(model), reference)
    with pytest.raises(ValueError, match="unknown compile mode"):
        accel.compile_parts(model, mode="fastest")


class _CountingEncoder(torch.nn.Module):
    """Fake model whose text encoder maps a text to a row of its own and counts the texts it encodes."""

    def __init__(self):
        super().__init__()
        self.encoded: list[str] = []

    def get_learned_conditioning(self, texts):
        self.encoded.extend(texts)
        return torch.stack([torch.full((3, 2), float(len(t))) for t in texts])


def test_each_distinct_text_is_encoded_once():
    model = _CountingEncoder()
    job = pipeline.Job(("a cat", "a cat", "a dog"), (1, 2, 3))
    cond, uncond = pipeline.conditioning(model, job, "blurry", 7.5, set())
    assert model.encoded == ["a cat", "a dog", "blurry"]
    assert cond[:, 0, 0].tolist() == [5.0, 5.0, 5.0] and cond.shape == (3, 3, 2)
    assert uncond.shape == (3, 3, 2) and uncond[:, 0, 0].tolist() == [6.0] * 3
    model.encoded.clear()
    cond, uncond = pipeline.conditioning(model, pipeline.Job(("a cat",) * 2, (1, 2)), "", 1.0, set())
    assert model.encoded == ["a cat"] and uncond is None and cond.shape[0] == 2


def test_text_encoding_matches_the_per_prompt_encoding(text_dir):
    model = tiny_model(text_dir)
    job = pipeline.Job(("red circle", "blue square", "red circle"), (0, 1, 2))
    cond, uncond = pipeline.conditioning(model, job, "", 5.0, set())
    with torch.no_grad():
        torch.testing.assert_close(cond, model.get_learned_conditioning(list(job.prompts)))
        torch.testing.assert_close(uncond, model.get_learned_conditioning(3 * [""]))


class _HalfVae(torch.nn.Module):
    """Fake model with a half-precision first stage that overflows unless it runs in float32."""

    def __init__(self):
        super().__init__()
        self.first_stage_model = torch.nn.Conv2d(4, 3, 1).to(torch.bfloat16)

    def decode_first_stage(self, z):
        if self.first_stage_model.weight.dtype != torch.float32:
            return torch.full((z.shape[0], 3, 4, 4), float("nan"))
        return torch.zeros(z.shape[0], 3, 4, 4)


def test_nan_fallback_upcasts_a_half_autoencoder(caplog):
    model = _HalfVae()
    with caplog.at_level(logging.WARNING):
        images = pipeline.decode(model, torch.zeros(1, 4, 2, 2), pipeline.Precision("cpu", torch.bfloat16))
    assert torch.equal(images, torch.full((1, 3, 4, 4), 0.5))
    assert model.first_stage_model.weight.dtype == torch.float32 and "runs in float32" in caplog.text


@pytest.mark.gpu
@GPU
def test_fast_path_matches_the_plain_path_on_cuda(text_dir):
    plain = tiny_model(text_dir, "cuda")
    reference = unet_out(plain)
    fast = tiny_model(text_dir, "cuda")
    accel.apply_fast_path(fast, accel.FastPath.cuda(torch.float16))
    out = unet_out(fast)
    assert float((out - reference).abs().max()) < 0.02 * float(reference.abs().max())


@pytest.mark.gpu
@GPU
def test_cuda_graph_compile_keeps_outputs_across_calls(text_dir):
    model = tiny_model(text_dir, "cuda")
    reference = [unet_out(model, seed) for seed in (0, 1)]
    accel.compile_parts(model, unet=True, vae=False, mode="reduce-overhead")
    outs = [unet_out(model, seed) for seed in (0, 1, 0, 1)]  # earlier outputs must survive later replays
    for out, ref in zip(outs, reference * 2):
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)

"""Parity with the original SDXL code (Stability-AI's ``sgm``) on every case of a reference folder.

The folder is ``$SDXL_REFERENCE_DIR`` when set, else ``../shared/reference/sdxl``; any case set of the same format
runs unchanged (sizes, prompts, steps and scales come from each case's own config and json). The cases' calls are
in the folder's README; here each kind is run through the project's classes (sampling through ``ldm.samplers``).
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.util import instantiate_from_config

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("SDXL_REFERENCE_DIR") or ROOT.parent / "shared" / "reference" / "sdxl")
CASES = json.loads((REFERENCE / "cases.json").read_text()) if (REFERENCE / "cases.json").is_file() else []


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one thread is fastest, and keeps these tests quick on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def register_open_clip_configs(folder: Path) -> None:
    """Make the folder's small open_clip model configs (json with ``text_cfg``) known to open_clip, offline."""
    import open_clip

    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "text_cfg" in data and "embed_dim" in data:
            open_clip.add_model_config(str(path))


@functools.lru_cache(maxsize=None)
def weights(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(REFERENCE / name))


@functools.lru_cache(maxsize=None)
def built(config: str, weights_name: str, prefix: str, renames: tuple) -> torch.nn.Module:
    """The case's object: the config's model (``model:`` section or bare), or its sub-module at ``prefix`` when the
    model has one, with the prefixed (and renamed) weights loaded strictly."""
    cwd = os.getcwd()
    os.chdir(REFERENCE)  # relative text-encoder folders in the configs, as the original ran
    try:
        register_open_clip_configs(REFERENCE)
        cfg = OmegaConf.load(REFERENCE / config)
        obj = instantiate_from_config(cfg.model if "model" in cfg else cfg)
    finally:
        os.chdir(cwd)
    if prefix and any(k.startswith(prefix) for k in obj.state_dict()):
        obj = obj.get_submodule(prefix[:-1])
    sd = {k[len(prefix):]: v for k, v in weights(weights_name).items() if k.startswith(prefix)}
    if renames:
        sd = {k: v for k, v in sd.items() if k.startswith(tuple(src for src, _ in renames))}
        for src, dst in renames:
            sd = {(dst + k[len(src):] if k.startswith(src) else k): v for k, v in sd.items()}
    obj.load_state_dict(sd, strict=True)
    return obj.float().eval()


def case_object(case: dict) -> torch.nn.Module:
    return built(case["config"], case["weights"], case.get("weights_prefix", ""),
                 tuple(case.get("weights_rename", {}).items()))


def run_conditioner(case: dict, io: dict) -> dict[str, torch.Tensor]:
    """c = conditioner(batch); (c, uc) with the text zeroed in uc; each embedder alone; both tokenizers."""
    from ldm.modules.encoders.sdxl_conditioner import FrozenCLIPTextEmbedder, FrozenOpenCLIPEmbedder2

    cond = case_object(case)
    values = {k: io[k] for k in case["inputs"] if not k.startswith("negative_")}
    batch = {"txt": case["prompts"], **values}
    batch_uc = {"txt": case.get("negative_prompts", [""] * len(case["prompts"])),
                **{k: v.clone() for k, v in values.items()}}
    batch_uc.update({k[len("negative_"):]: io[k] for k in case["inputs"] if k.startswith("negative_")})
    c = cond(batch)
    c2, uc = cond.get_unconditional_conditioning(batch, batch_uc, force_uc_zero_embeddings=["txt"])
    got = {"crossattn": c.get("crossattn"), "vector": c.get("vector"), "c_crossattn": c2["crossattn"],
           "c_vector": c2["vector"], "uc_crossattn": uc["crossattn"], "uc_vector": uc["vector"]}
    for i, embedder in enumerate(cond.embedders):
        names = [k for k in case["outputs"] if k.startswith(f"emb{i}_")]
        if names:
            out = embedder(batch[embedder.input_key])
            got.update(zip(names, out if isinstance(out, (tuple, list)) else [out]))
        if isinstance(embedder, FrozenCLIPTextEmbedder):
            got["hf_tokens"] = embedder.tokenize(batch["txt"])
        elif isinstance(embedder, FrozenOpenCLIPEmbedder2):
            got["openclip_tokens"] = embedder.tokenize(batch["txt"])
    return got


def run_unet(case: dict, io: dict) -> dict[str, torch.Tensor]:
    """out = UNet(x, timesteps=..., context=..., y=...)."""
    unet = case_object(case)
    return {"out": unet(io["x"], **{k: io[k] for k in case["inputs"] if k != "x"})}


def run_denoiser(case: dict, io: dict) -> dict[str, torch.Tensor]:
    """denoised = denoiser(model, x, sigma, cond); the quantized sigma, its index and the sigma table."""
    engine = case_object(case)
    cond = {k: io[k] for k in ("crossattn", "vector") if k in io}
    quantized = engine.denoiser.possibly_quantize_sigma(io["sigma"])
    return {"denoised": engine.denoiser(engine.model, io["x"], io["sigma"], cond), "sigma_quantized": quantized,
            "c_noise": engine.denoiser.sigma_to_idx(quantized), "denoiser_sigmas": engine.denoiser.sigmas}


def guided_recorder(engine: Any, c: dict, uc: dict, scale: float, log: list) -> Callable:
    """D(x, sigma): one batched denoiser call on [uncond; cond] (recorded in ``log``), then CFG."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        xx, ss = torch.cat([x, x]), torch.cat([sigma, sigma]).float()
        out = engine.denoiser(engine.model, xx, ss, {k: torch.cat([uc[k], c[k]]) for k in c})
        log.append((xx, ss, out))
        out_uc, out_c = out.chunk(2)
        return out_uc + scale * (out_c - out_uc)
    return denoise


def run_sampling(case: dict, io: dict) -> dict[str, torch.Tensor]:
    """Euler (s_churn 0) over the legacy DDPM discretization with CFG, through ldm.samplers; then decoding."""
    from ldm.samplers.euler import sample_euler

    engine, args = case_object(case), case["args"]
    if float(args.get("s_churn", 0.0)) != 0.0:
        pytest.fail("only s_churn 0 (no fresh noise) is reproducible from stored inputs")
    c = {k[2:]: io[k] for k in case["inputs"] if k.startswith("c_")}
    uc = {k[3:]: io[k] for k in case["inputs"] if k.startswith("uc_")}
    sigmas = engine.denoiser.discretization(int(args["num_steps"]))
    x = io["randn"] * torch.sqrt(1.0 + sigmas[0] ** 2.0)
    log: list = []
    z = sample_euler(guided_recorder(engine, c, uc, float(args["cfg_scale"]), log), x, sigmas)
    samples_x = engine.decode_first_stage(z)
    return {"sampler_sigmas": sigmas, "samples_z": z, "samples_x": samples_x,
            "images": torch.clamp((samples_x + 1.0) / 2.0, min=0.0, max=1.0),
            "step_model_x": torch.stack([s[0] for s in log]), "step_model_sigma": torch.stack([s[1] for s in log]),
            "step_denoised_batched": torch.stack([s[2] for s in log])}


def run_autoencoder(case: dict, io: dict) -> dict[str, torch.Tensor]:
    """decoded = decode_first_stage(z) (first_stage_model.decode(z / scale_factor))."""
    return {"decoded": case_object(case).decode_first_stage(io["z"])}


RUNNERS = {"conditioner": run_conditioner, "unet": run_unet, "denoiser": run_denoiser, "sampling": run_sampling,
           "autoencoder": run_autoencoder}


def compare(case: dict, got: dict[str, torch.Tensor], io: dict[str, torch.Tensor]) -> list[str]:
    """Failures (one line each) of every output the case lists, within its tolerances."""
    failures = []
    for name in case["outputs"]:
        ref, value = io[name], got.get(name)
        if value is None:
            failures.append(f"{name}: not computed")
            continue
        value = value.detach().cpu()
        if tuple(value.shape) != tuple(ref.shape):
            failures.append(f"{name}: shape {list(value.shape)} vs reference {list(ref.shape)}")
        elif not ref.is_floating_point():
            wrong = int((value.to(ref.dtype) != ref).sum())
            if wrong:
                failures.append(f"{name}: {wrong} of {ref.numel()} integer values differ")
        else:
            tol = case.get("tolerances", {}).get(name, {"atol": case["atol"], "rtol": case["rtol"]})
            value = value.to(ref.dtype)
            if not torch.allclose(value, ref, atol=tol["atol"], rtol=tol["rtol"]):
                err = float((value - ref).abs().max())
                failures.append(f"{name}: max abs diff {err:.3e} over atol {tol['atol']} rtol {tol['rtol']}")
    return failures


@pytest.mark.skipif(not CASES, reason=f"no SDXL reference cases at {REFERENCE} (set SDXL_REFERENCE_DIR)")
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_sdxl_case_matches_original(case):
    if case["kind"] not in RUNNERS:
        pytest.fail(f"case '{case['name']}' has kind '{case['kind']}', which this test does not know")
    io = load_file(str(REFERENCE / case["io"]))
    with torch.no_grad():
        got = RUNNERS[case["kind"]](case, io)
    assert compare(case, got, io) == []


def test_reference_folder_is_complete_or_absent():
    """The default folder, when present, holds every kind the issue names (a partial copy would test less)."""
    if not CASES:
        pytest.skip(f"no SDXL reference cases at {REFERENCE}")
    assert {"conditioner", "unet", "denoiser", "sampling", "autoencoder"} <= {c["kind"] for c in CASES}


def tiny_engine() -> Any:
    """The whole engine of the folder's denoiser case (weights loaded)."""
    case = next((c for c in CASES if c["kind"] == "denoiser" and not c.get("weights_prefix")), None)
    if case is None:
        pytest.skip("no whole-engine case in the reference folder")
    return case_object(case)


@pytest.mark.skipif(not CASES, reason=f"no SDXL reference cases at {REFERENCE}")
def test_engine_conventions_beyond_the_cases():
    """float64 sigmas quantize like float32 ones; encode/decode scale by scale_factor on a non-square image; a batch
    without a key the conditioner reads is one readable error."""
    engine = tiny_engine()
    sigmas = torch.tensor([0.02, 0.5, 1.0, 7.3, 30.0])
    assert torch.equal(engine.denoiser.sigma_to_idx(sigmas.double()), engine.denoiser.sigma_to_idx(sigmas))
    assert engine.denoiser.sigma_to_idx(sigmas)[[0, -1]].tolist() == [0, len(engine.denoiser.sigmas) - 1]
    image = torch.rand(1, 3, 24, 40) * 2 - 1
    with torch.no_grad():
        z = engine.encode_first_stage(image, sample=False)
        mean = engine.first_stage_model.encode(image).mode()
        decoded = engine.decode_first_stage(z)
    assert torch.allclose(z, engine.scale_factor * mean)
    assert decoded.shape == image.shape
    keys = [e.input_key for e in engine.conditioner.embedders if e.input_key != "txt"]
    with pytest.raises(KeyError, match=keys[0]):
        engine.conditioner({"txt": ["a cat"]})


def test_sgm_names_build_our_classes():
    """The sgm.* targets of the original configs build this project's classes, nothing imported from sgm."""
    from ldm.sgm_aliases import SGM_ALIASES
    from ldm.util import get_obj_from_str

    for alias, ours in SGM_ALIASES.items():
        cls = get_obj_from_str(alias)
        assert f"{cls.__module__}.{cls.__qualname__}" == ours and cls.__module__.startswith("ldm.")

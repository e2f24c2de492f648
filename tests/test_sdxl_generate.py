"""SDXL generation: conditioning batches, the original's sampling through ldm.samplers, every registry sampler,
img2img, the refiner hand-off, float32 decoding, key detection, the watermark and the scripts' path on tiny
random-weight SDXL checkpoints in the original key layout (built here, in the original config format)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from ldm import samplers
from ldm.inference import sdxl, sdxl_session
from ldm.inference.errors import UsageError
from ldm.samplers.run import run_schedule

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("SDXL_REFERENCE_DIR", ROOT.parent / "shared" / "reference" / "sdxl"))
LAYOUTS = ROOT.parent / "shared" / "reference" / "layouts"

OUTDIM = 64  # ConcatTimestepEmbedderND width of the tiny configs (SDXL: 256)
WIDTH = 16  # both text encoders' width (and bigG's pooled embedding)
HF_TEXT = {"hidden_size": WIDTH, "intermediate_size": 64, "num_hidden_layers": 3, "num_attention_heads": 2,
           "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
           "model_type": "clip_text_model"}
OPEN_CLIP = {"embed_dim": WIDTH, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                                "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": WIDTH, "heads": 2, "layers": 3}}


def _size_embedder(key: str) -> dict:
    return {"is_trainable": False, "input_key": key, "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
            "params": {"outdim": OUTDIM}}


def _bigg() -> dict:
    return {"is_trainable": False, "input_key": "txt", "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
            "params": {"arch": "SDXL-Tiny-Test", "arch_config": OPEN_CLIP, "version": None, "freeze": True,
                       "layer": "penultimate", "always_return_pooled": True, "legacy": False}}


def tiny_sdxl_config(text_dir: Path, refiner: bool = False) -> dict:
    """A tiny SDXL base (or refiner) config in the original (sgm) format: 32 px images, 16 x 16 latents."""
    if refiner:
        emb = [_bigg(), _size_embedder("original_size_as_tuple"), _size_embedder("crop_coords_top_left"),
               _size_embedder("aesthetic_score")]
        context, adm = WIDTH, WIDTH + 5 * OUTDIM
    else:
        clip_l = {"is_trainable": False, "input_key": "txt",
                  "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                  "params": {"version": str(text_dir), "layer": "hidden", "layer_idx": 2}}
        emb = [clip_l, _bigg(), _size_embedder("original_size_as_tuple"), _size_embedder("crop_coords_top_left"),
               _size_embedder("target_size_as_tuple")]
        context, adm = 2 * WIDTH, WIDTH + 6 * OUTDIM
    unet = {"adm_in_channels": adm, "num_classes": "sequential", "use_checkpoint": False, "in_channels": 4,
            "out_channels": 4, "model_channels": 32, "attention_resolutions": [2], "num_res_blocks": 1,
            "channel_mult": [1, 2], "num_head_channels": 16, "use_linear_in_transformer": True,
            "transformer_depth": [1, 2 if refiner else 1], "context_dim": context,
            "spatial_transformer_attn_type": "softmax-xformers"}
    vae = {"embed_dim": 4, "monitor": "val/rec_loss", "lossconfig": {"target": "torch.nn.Identity"},
           "ddconfig": {"attn_type": "vanilla-xformers", "double_z": True, "z_channels": 4, "resolution": 32,
                        "in_channels": 3, "out_ch": 3, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                        "attn_resolutions": [], "dropout": 0.0}}
    return {"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": {
        "scale_factor": 0.13025, "disable_first_stage_autocast": True,
        "denoiser_config": {"target": "sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser", "params": {
            "num_idx": 1000,
            "scaling_config": {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"},
            "discretization_config": {"target": "sgm.modules.diffusionmodules.discretizer.LegacyDDPMDiscretization"}}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": emb}},
        "first_stage_config": {"target": "sgm.models.autoencoder.AutoencoderKL", "params": vae}}}}


def write_tiny_sdxl(folder: Path, name: str, refiner: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """``<name>.yaml`` and ``<name>.safetensors`` (seeded random weights, every zero-initialised weight refilled)."""
    from ldm.checkpoint import save_safetensors
    from ldm.util import instantiate_from_config

    folder.mkdir(parents=True, exist_ok=True)
    text_dir = folder / "tiny-sdxl-clip-l"
    text_dir.mkdir(exist_ok=True)
    (text_dir / "config.json").write_text(json.dumps(HF_TEXT), encoding="utf-8")
    config = OmegaConf.create(tiny_sdxl_config(text_dir, refiner))
    config_path = folder / f"{name}.yaml"
    OmegaConf.save(config, config_path)
    torch.manual_seed(seed)
    engine = instantiate_from_config(config.model)
    with torch.no_grad():
        for param in engine.model.parameters():
            if not param.abs().sum():
                param.normal_(0.0, 0.05)
    ckpt_path = folder / f"{name}.safetensors"
    save_safetensors(engine.state_dict(), ckpt_path)
    return config_path, ckpt_path


def build(config_path: Path, ckpt_path: Path) -> torch.nn.Module:
    """The engine of a tiny file, loaded strictly through the scripts' loader."""
    from ldm.inference import loading

    source = loading.resolve_source(ckpt_path, config_path)
    config = loading.read_config(config_path)
    return loading.load_model(source, config, None, None, "cpu")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from two OpenMP threads; on the busy shared machine they wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("sdxl")
    base = write_tiny_sdxl(folder, "tiny-sdxl-base")
    refiner = write_tiny_sdxl(folder, "tiny-sdxl-refiner", refiner=True, seed=1)
    return {"base": base, "refiner": refiner, "folder": folder}


@pytest.fixture(scope="module")
def base_engine(tiny) -> torch.nn.Module:
    return build(*tiny["base"])


def _settings(mode: str = "txt2img", steps: int = 4, sampler: str | None = None, **kw) -> sdxl_session.SdxlSettings:
    name, schedule = sdxl.default_options(sampler, None)
    defaults = dict(negative_prompt="", steps=steps, sampler=samplers.resolve(name, schedule), scale=5.0,
                    width=32, height=32)
    defaults.update(kw)
    return sdxl_session.SdxlSettings(mode, **defaults)


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


# --- the original's conventions --------------------------------------------------------------------------------

def test_batches_follow_the_original_get_batch():
    opts = sdxl.SdxlOptions(original_size=(640, 480), crop=(3, 5), aesthetic_score=7.0, negative_aesthetic_score=1.5)
    keys = ["txt", "original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple", "aesthetic_score"]
    batch, uc = sdxl.batches(keys, ["a", "b"], ["n", "n"], width=96, height=64, opts=opts)
    assert batch["txt"] == ["a", "b"] and uc["txt"] == ["n", "n"]
    assert batch["original_size_as_tuple"].tolist() == [[480, 640]] * 2  # (height, width)
    assert batch["crop_coords_top_left"].tolist() == [[3, 5]] * 2
    assert batch["target_size_as_tuple"].tolist() == [[64, 96]] * 2
    assert batch["original_size_as_tuple"].dtype == torch.int64
    assert batch["aesthetic_score"].tolist() == [[7.0]] * 2 and uc["aesthetic_score"].tolist() == [[1.5]] * 2
    assert torch.equal(uc["target_size_as_tuple"], batch["target_size_as_tuple"])
    plain, _ = sdxl.batches(keys[:4], ["a"], [""], width=96, height=64, opts=sdxl.SdxlOptions())
    assert plain["original_size_as_tuple"].tolist() == [[64, 96]] and plain["crop_coords_top_left"].tolist() == [[0, 0]]


def test_refiner_hand_off_splits_the_schedule():
    sigmas = torch.linspace(10, 0, 11)
    first, second = sdxl.split(sigmas, 0.8)
    assert len(first) - 1 == 8 and len(second) - 1 == 2 and first[-1] == second[0]
    assert len(sdxl.split(sigmas, 0.01)[0]) == 2 and len(sdxl.split(sigmas, 0.99)[1]) == 2
    with pytest.raises(UsageError, match="at least 2 sampling steps"):
        sdxl.split(sigmas[-2:], 0.5)


def _reference_engine():
    import open_clip

    from safetensors.torch import load_file

    from ldm.util import instantiate_from_config
    from ldm.weight_init import skipped_weight_init

    open_clip.add_model_config(str(REFERENCE / "SDXL-Tiny-OpenCLIP-16A.json"))
    config = OmegaConf.load(REFERENCE / "sdxl_tiny.yaml")
    config.model.params.conditioner_config.params.emb_models[0].params.version = str(REFERENCE / "hf_clip_text_sdxl")
    with skipped_weight_init():  # every weight comes from the file
        engine = instantiate_from_config(config.model)
    engine.load_state_dict(load_file(str(REFERENCE / "sdxl_tiny.weights.safetensors")))
    return engine.eval()


@pytest.mark.skipif(not (REFERENCE / "sampling.io.safetensors").is_file(), reason="no SDXL reference folder")
def test_default_sampling_reproduces_the_reference_case():
    """The original's LegacyDDPM grid + Euler + CFG (uncond first) through ldm.samplers, and the conditioning
    batch of the generation path, against the numbers of the original code."""
    from safetensors.torch import load_file

    cases = {c["name"]: c for c in json.loads((REFERENCE / "cases.json").read_text())}
    case, io = cases["sampling"], load_file(str(REFERENCE / "sampling.io.safetensors"))
    engine = _reference_engine()
    c = {"crossattn": io["c_crossattn"], "vector": io["c_vector"]}
    uc = {"crossattn": io["uc_crossattn"], "vector": io["uc_vector"]}
    args = case["args"]
    choice = samplers.resolve(*sdxl.default_options(None, None))
    sigmas = sdxl.schedule(engine, choice, args["num_steps"])
    tol = case.get("tolerances", {})

    def close(name, got):
        t = tol.get(name, {})
        assert torch.allclose(got.float(), io[name], atol=t.get("atol", case["atol"]), rtol=t.get("rtol", case["rtol"]))
    close("sampler_sigmas", sigmas)
    assert sdxl.vp_start(choice)
    x = io["randn"] * float((1 + sigmas[0] ** 2) ** 0.5)
    with torch.no_grad():
        z = sdxl.finish(run_schedule(choice, sdxl.EngineDenoiser(engine, uc, args["cfg_scale"]).bind(c), x,
                                              sigmas), sigmas)
        close("samples_z", z)
        close("images", sdxl.decode(engine, z, reduced=False, vae_given=False))
    cond_case = cases["conditioner"]
    cio = load_file(str(REFERENCE / cond_case["io"]))
    for i, prompt in enumerate(cond_case["prompts"]):  # one row at a time: each has its own sizes
        h, w = cio["target_size_as_tuple"][i].tolist()
        oh, ow = cio["original_size_as_tuple"][i].tolist()
        opts = sdxl.SdxlOptions(original_size=(ow, oh), crop=tuple(cio["crop_coords_top_left"][i].tolist()))
        with torch.no_grad():  # empty negative prompt: zeroed text, as the original (the case's negatives are unused)
            c2, uc2 = sdxl.conditioning(engine, [prompt], "", w, h, opts)
        for name, got in (("c_crossattn", c2["crossattn"]), ("c_vector", c2["vector"]),
                          ("uc_crossattn", uc2["crossattn"]), ("uc_vector", uc2["vector"])):
            t = cond_case.get("tolerances", {}).get(name, {})
            assert torch.allclose(got[0], cio[name][i], atol=t.get("atol", cond_case["atol"]),
                                  rtol=t.get("rtol", cond_case["rtol"])), name


# --- sampling on tiny random-weight checkpoints ----------------------------------------------------------------

def test_txt2img_latents_depend_on_each_seed_only(base_engine):
    session = sdxl_session.SdxlSession(base_engine, _settings(steps=2), "cpu", channels=4, factor=2)
    assert session.steps_per_image == 2
    two = session.latents(["a cat", "a cat"], _gens(2, seed=7))
    one = session.latents(["a cat"], _gens(1, seed=8))
    assert two.shape == (2, 4, 16, 16) and torch.isfinite(two).all()
    assert torch.allclose(two[1:], one, rtol=1e-4, atol=1e-3) and not torch.allclose(two[0], two[1])
    images = session.images(two, reduced=False)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("name", [s.name for s in samplers.SAMPLERS])
def test_every_registry_sampler_runs(base_engine, name):
    session = sdxl_session.SdxlSession(base_engine, _settings(steps=2, sampler=name), "cpu", channels=4, factor=2)
    z = session.latents(["a red circle"], _gens(1))
    assert z.shape == (1, 4, 16, 16) and torch.isfinite(z).all() and z.abs().max() > 0


def test_negative_prompt_is_encoded_and_empty_one_zeroed(base_engine):
    with torch.no_grad():
        _, zeroed = sdxl.conditioning(base_engine, ["a cat"], "", 32, 32, sdxl.SdxlOptions())
        _, negative = sdxl.conditioning(base_engine, ["a cat"], "blurry", 32, 32, sdxl.SdxlOptions())
    assert not zeroed["crossattn"].abs().sum() and negative["crossattn"].abs().sum() > 0
    assert torch.equal(zeroed["vector"][:, WIDTH:], negative["vector"][:, WIDTH:])  # sizes kept


def test_img2img_strength_zero_keeps_the_latents_and_one_is_txt2img(base_engine):
    image = torch.rand(1, 3, 32, 32) * 2 - 1
    keep = sdxl_session.SdxlSession(base_engine, _settings("img2img", strength=0.0), "cpu", 4, 2, init_image=image)
    mean, _ = keep.posterior
    assert keep.steps_per_image == 0
    assert torch.allclose(keep.latents(["x"], _gens(1)), base_engine.scale_factor * mean)
    half = sdxl_session.SdxlSession(base_engine, _settings("img2img", steps=4, strength=0.5), "cpu", 4, 2,
                                    init_image=image)
    assert half.steps_per_image == 3  # the web UI's convention: int(0.5 * 4) + 1 levels
    z = half.latents(["x"], _gens(1))
    assert torch.isfinite(z).all()
    full = sdxl_session.SdxlSession(base_engine, _settings("img2img", steps=2, strength=1.0), "cpu", 4, 2,
                                    init_image=image)
    txt = sdxl_session.SdxlSession(base_engine, _settings(steps=2), "cpu", 4, 2)
    assert torch.allclose(full.latents(["x"], _gens(1)), txt.latents(["x"], _gens(1)), atol=1e-5)


class _Recorder:
    """Counts the denoiser calls of an engine and remembers the first input it saw."""

    def __init__(self, engine):
        self.calls, self.first = 0, None
        self.inner = engine.denoiser.forward

        def forward(network, x, sigma, cond, **kw):
            self.calls += 1
            self.first = x.clone() if self.first is None else self.first
            return self.inner(network, x, sigma, cond, **kw)
        engine.denoiser.forward = forward


def test_refiner_continues_from_the_base_latents(tiny, base_engine):
    refiner = build(*tiny["refiner"])
    base_calls, refiner_calls = _Recorder(base_engine), _Recorder(refiner)
    loaded = []

    def load():
        loaded.append(True)
        return refiner
    s = _settings(steps=5, options=sdxl.SdxlOptions(refiner_switch=0.6))
    session = sdxl_session.SdxlSession(base_engine, s, "cpu", 4, 2, load_refiner=load)
    seen = []
    z = session.latents(["a cat"], _gens(1), callback=lambda info: seen.append((info.i, info.total)))
    base_engine.denoiser.forward = base_calls.inner
    refiner.denoiser.forward = refiner_calls.inner
    assert (base_calls.calls, refiner_calls.calls, len(loaded)) == (3, 2, 1)
    assert seen == [(i, 5) for i in range(5)]
    c, uc = sdxl.conditioning(base_engine, ["a cat"], "", 32, 32, s.options)
    sigmas = sdxl.schedule(base_engine, s.sampler, 5)
    x = sdxl.start(None, base_engine.scale_factor, sigmas, _gens(1), (4, 16, 16), "cpu", vp=True, img2img=False)
    with torch.no_grad():  # the base alone down to the switch level: where the refiner starts
        handed = run_schedule(s.sampler, sdxl.EngineDenoiser(base_engine, uc, 5.0).bind(c), x, sigmas[:4])
    assert torch.allclose(refiner_calls.first[:1], handed, atol=1e-5)
    assert torch.isfinite(z).all() and refiner_calls.first.shape == (2, 4, 16, 16)  # guided: [uc; c]
    session.close()
    assert session.active is base_engine and session.refiner is None


# --- detection by keys, wrong files -----------------------------------------------------------------------------

@pytest.mark.skipif(not (LAYOUTS / "sdxl_base_keys.json").is_file(), reason="no SDXL layout files")
@pytest.mark.parametrize("layout,family", [("sdxl_base_keys.json", "sdxl"), ("sdxl_refiner_keys.json", "sdxl-refiner")])
def test_full_size_layouts_are_detected(layout, family):
    from ldm.model_family import describe_mismatch_hint, detect_family

    sd = {k: torch.empty(v[0], device="meta") for k, v in json.loads((LAYOUTS / layout).read_text()).items()}
    found = detect_family(sd, "sd_xl_whatever.safetensors")
    assert found.name == family and found.config.parent.name == "sdxl"
    hint = describe_mismatch_hint(sd, {"model.diffusion_model.input_blocks.0.0.weight": torch.empty(320, 4, 3, 3),
                                       "cond_stage_model.transformer.text_model.x": torch.empty(1)})
    assert f"configs/sdxl/{found.config.name}" in hint


def test_tiny_files_are_detected_by_their_keys(tiny):
    from ldm.inference.loading import _keys_and_shapes
    from ldm.model_family import detect_family

    assert detect_family(_keys_and_shapes(tiny["base"][1])[0]).name == "sdxl"
    assert detect_family(_keys_and_shapes(tiny["refiner"][1])[0]).name == "sdxl-refiner"


def test_watermark_is_the_original_48_bits():
    from ldm.modules.watermark import WATERMARK_SDXL, put_watermark, read_watermark_bits

    assert len(WATERMARK_SDXL) == 48
    assert int("".join(map(str, WATERMARK_SDXL)), 2) == 0b101100111110110010010000011110111011000110011110
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (320, 384, 3), dtype=np.uint8))
    marked = put_watermark(image, WATERMARK_SDXL)
    assert read_watermark_bits(marked, 48) == WATERMARK_SDXL
    assert np.abs(np.asarray(marked).astype(int) - np.asarray(image).astype(int)).max() > 0


# --- LoRA and embeddings ----------------------------------------------------------------------------------------

def test_kohya_sdxl_lora_merges_into_both_text_encoders_and_the_unet(tiny, tmp_path):
    from safetensors.torch import save_file

    from ldm.modules.lora import LoraSpec, merge_loras

    engine = build(*tiny["base"])
    params = dict(engine.named_parameters())
    unet_key = "model.diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    te1_key = "conditioner.embedders.0.transformer.text_model.encoder.layers.1.mlp.fc1.weight"
    te2_key = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    g = torch.Generator().manual_seed(3)
    factors = {}
    for name, out, inner in (("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k", 64, 2 * WIDTH),
                             ("lora_te1_text_model_encoder_layers_1_mlp_fc1", 64, WIDTH),
                             ("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", WIDTH, WIDTH)):
        factors[f"{name}.lora_down.weight"] = torch.randn(2, inner, generator=g)
        factors[f"{name}.lora_up.weight"] = torch.randn(out, 2, generator=g)
        factors[f"{name}.alpha"] = torch.tensor(1.0)
    path = tmp_path / "sdxl-lora.safetensors"
    save_file(factors, str(path))
    before = {k: params[k].detach().clone() for k in (unet_key, te1_key, te2_key)}
    merged = merge_loras(engine, [LoraSpec(path, unet_weight=1.0, text_weight=0.5)])

    def delta(name):
        return factors[f"{name}.lora_up.weight"] @ factors[f"{name}.lora_down.weight"] / 2
    assert torch.allclose(params[unet_key] - before[unet_key],
                          delta("lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k"), atol=1e-5)
    assert torch.allclose(params[te1_key] - before[te1_key],
                          0.5 * delta("lora_te1_text_model_encoder_layers_1_mlp_fc1"), atol=1e-5)
    v_rows = params[te2_key][2 * WIDTH:] - before[te2_key][2 * WIDTH:]  # v is the third row block of in_proj
    assert torch.allclose(v_rows, 0.5 * delta("lora_te2_text_model_encoder_layers_1_self_attn_v_proj"), atol=1e-5)
    assert torch.equal(params[te2_key][:2 * WIDTH], before[te2_key][:2 * WIDTH])
    merged.restore()
    assert all(torch.equal(params[k], v) for k, v in before.items())


def test_long_prompts_take_more_chunks_and_weights_change_the_features(base_engine):
    long = ", ".join(["a small red house on a hill"] * 14)  # > 75 tokens
    with torch.no_grad():
        c, uc = sdxl.conditioning(base_engine, [long], "", 32, 32, sdxl.SdxlOptions())
        plain, _ = sdxl.conditioning(base_engine, ["a red house"], "", 32, 32, sdxl.SdxlOptions())
        weighted, _ = sdxl.conditioning(base_engine, ["a (red:1.5) house"], "", 32, 32, sdxl.SdxlOptions())
    assert c["crossattn"].shape == (1, 154, 2 * WIDTH) and uc["crossattn"].shape == (1, 154, 2 * WIDTH)
    assert c["vector"].shape == plain["vector"].shape
    assert not torch.allclose(weighted["crossattn"], plain["crossattn"])
    assert torch.allclose(weighted["vector"], plain["vector"])  # the pooled part ignores weights


def test_sdxl_embeddings_give_each_encoder_its_own_vectors(base_engine, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(5)
    clip_l, clip_g = torch.randn(2, WIDTH, generator=g), torch.randn(2, WIDTH, generator=g)
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir(), second.mkdir()
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(first / "zorpstyle.safetensors"))
    save_file({"clip_l": clip_l, "clip_g": clip_g * 2}, str(second / "zorpstyle.safetensors"))
    with torch.no_grad():
        a, _ = sdxl.conditioning(base_engine, ["zorpstyle cat"], "", 32, 32, sdxl.SdxlOptions(), embeddings=first)
        b, _ = sdxl.conditioning(base_engine, ["zorpstyle cat"], "", 32, 32, sdxl.SdxlOptions(), embeddings=second)
        plain, _ = sdxl.conditioning(base_engine, ["zorpstyle cat"], "", 32, 32, sdxl.SdxlOptions(),
                                     embeddings=tmp_path / "none")
    assert torch.equal(a["crossattn"][..., :WIDTH], b["crossattn"][..., :WIDTH])  # CLIP-L read clip_l
    assert not torch.allclose(a["crossattn"][..., WIDTH:], b["crossattn"][..., WIDTH:])  # bigG read clip_g
    assert not torch.allclose(a["vector"][:, :WIDTH], b["vector"][:, :WIDTH])  # and the pooled embedding
    assert not torch.allclose(a["crossattn"][..., :WIDTH], plain["crossattn"][..., :WIDTH])
    save_file({"emb_params": torch.randn(1, 24)}, str(first / "sd1thing.safetensors"))
    with pytest.raises(UsageError, match="sd1thing"):
        sdxl.conditioning(base_engine, ["sd1thing"], "", 32, 32, sdxl.SdxlOptions(), embeddings=first)


def test_half_autoencoder_decodes_in_float32_unless_a_vae_was_given(tiny):
    engine = build(*tiny["base"])
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    want = sdxl.decode(engine, z, reduced=False, vae_given=False)
    engine.first_stage_model.to(torch.bfloat16)  # what --fast does to the weights
    kept = sdxl.decode(engine, z, reduced=True, vae_given=True)  # a --vae (fp16-fixed) stays as it is
    assert next(engine.first_stage_model.parameters()).dtype == torch.bfloat16 and kept.dtype == torch.float32
    got = sdxl.decode(engine, z, reduced=True, vae_given=False)
    assert next(engine.first_stage_model.parameters()).dtype == torch.float32
    assert torch.allclose(got, want, atol=1e-2)


# --- the scripts' path ------------------------------------------------------------------------------------------

def _script(name: str, argv: list[str]) -> int:
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _common(outdir: Path, steps: int = 3) -> list[str]:
    return ["--W", "32", "--H", "32", "--steps", str(steps), "--n_samples", "1", "--n_iter", "1", "--outdir",
            str(outdir), "--no_safety_check", "--skip_grid", "--seed", "5"]


def _parameters(outdir: Path) -> tuple[list[Path], str]:
    from ldm.inference.outputs import read_parameters

    files = sorted((outdir / "samples").glob("*.png"))
    return files, read_parameters(files[0]) if files else ""


def test_txt2img_and_img2img_scripts_run_an_sdxl_checkpoint(tiny, tmp_path):
    _, ckpt = tiny["base"]  # its config is the yaml beside it
    out = tmp_path / "txt"
    assert _script("txt2img", ["--ckpt", str(ckpt), "--prompt", "a cat", "--original_size", "64x48", "--crop", "2",
                               "2", *_common(out)]) == 0
    files, params = _parameters(out)
    assert len(files) == 1 and Image.open(files[0]).size == (32, 32)
    assert "Sampler: Euler," in params and "Schedule type" not in params and "Seed: 5" in params
    init = tmp_path / "init.png"
    Image.open(files[0]).save(init)
    out2 = tmp_path / "img"
    assert _script("img2img", ["--ckpt", str(ckpt), "--prompt", "a dog", "--init-img", str(init), "--strength",
                               "0.5", "--sampler", "DPM++ 2M Karras", *_common(out2, steps=4)]) == 0
    files2, params2 = _parameters(out2)
    assert len(files2) == 1 and "Sampler: DPM++ 2M" in params2 and "Denoising strength: 0.5" in params2


def test_refiner_hand_off_through_txt2img(tiny, tmp_path):
    _, base = tiny["base"]
    _, refiner = tiny["refiner"]
    out = tmp_path / "refined"
    assert _script("txt2img", ["--ckpt", str(base), "--refiner", str(refiner), "--refiner_switch", "0.5",
                               "--prompt", "a cat", "--aesthetic_score", "7", *_common(out, steps=4)]) == 0
    files, params = _parameters(out)
    assert len(files) == 1 and "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.5" in params
    plain = tmp_path / "plain"
    assert _script("txt2img", ["--ckpt", str(base), "--prompt", "a cat", *_common(plain, steps=4)]) == 0
    assert not np.array_equal(np.asarray(Image.open(files[0])), np.asarray(Image.open(_parameters(plain)[0][0])))


def test_sdxl_plan_defaults_to_1024_pixels_and_the_original_sampler(tiny, tmp_path):
    from ldm.inference.args import parse_options
    from ldm.inference.run import plan

    p = plan(parse_options(["--ckpt", str(tiny["base"][1]), "--outdir", str(tmp_path / "o")], "txt2img"))
    assert (p.width, p.height) == (1024, 1024)
    assert (p.opts.sampler, p.opts.schedule) == ("euler", "legacy_ddpm")
    chosen = plan(parse_options(["--ckpt", str(tiny["base"][1]), "--sampler", "ddim", "--outdir",
                                 str(tmp_path / "o")], "txt2img"))
    assert (chosen.opts.sampler, chosen.opts.schedule) == ("ddim", "ddim")  # a chosen sampler is kept


def _sd1_checkpoint(folder: Path) -> Path:
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import write_tiny_model

    return write_tiny_model(folder, name="sd1-tiny")[1]


@pytest.mark.parametrize("case,needle", [
    ("sd1 with sdxl config", "is an SD 1.x checkpoint, but the config builds an SDXL base model"),
    ("sdxl with sd1 config", "is an SDXL base model, but the config builds a Stable Diffusion 1/2 model"),
    ("refiner as base", "is an SDXL refiner"),
    ("base as refiner", "is an SDXL base model"),
    ("refiner with sd1", "SDXL base models only"),
])
def test_wrong_files_get_one_clear_line(tiny, tmp_path, capsys, case, needle):
    base_yaml, base = tiny["base"]
    refiner = tiny["refiner"][1]
    argv = {"sd1 with sdxl config": ["--ckpt", str(_sd1_checkpoint(tmp_path / "sd1")), "--config", str(base_yaml)],
            "sdxl with sd1 config": ["--ckpt", str(base), "--config",
                                     str(ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml")],
            "refiner as base": ["--ckpt", str(refiner)],
            "base as refiner": ["--ckpt", str(base), "--refiner", str(base)],
            "refiner with sd1": ["--ckpt", str(_sd1_checkpoint(tmp_path / "sd1")), "--refiner", str(refiner)]}[case]
    out = tmp_path / "out"
    assert _script("txt2img", [*argv, "--prompt", "x", *_common(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())


def test_python_api_runs_sdxl_with_its_options(tiny):
    from ldm.api import Generator

    gen = Generator.load(tiny["base"][1], device="cpu")
    assert gen.loaded.kind == sdxl.SDXL
    result = gen.txt2img("a cat", width=32, height=32, steps=2, seed=3, sampler="euler",
                         sdxl=sdxl.SdxlOptions(original_size=(512, 512), crop=(8, 8)))
    assert len(result.images) == 1 and result.images[0].size == (32, 32) and "Sampler: Euler" in result.parameters[0]
    other = gen.txt2img("a cat", width=32, height=32, steps=2, seed=3, sampler="euler")
    assert not np.array_equal(np.asarray(result.images[0]), np.asarray(other.images[0]))  # the size conditioning
    default = gen.txt2img("a cat", width=32, height=32, steps=2, seed=3)  # no sampler: the original's
    named = gen.txt2img("a cat", width=32, height=32, steps=2, seed=3, sampler=sdxl.DEFAULT_SAMPLER,
                        schedule=sdxl.DEFAULT_SCHEDULE)
    assert default.parameters == named.parameters
    assert np.array_equal(np.asarray(default.images[0]), np.asarray(named.images[0]))


def test_vae_flag_and_refiner_alone_in_img2img(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    _, base = tiny["base"]
    vae = {k[len("first_stage_model."):]: v for k, v in load_file(str(base)).items()
           if k.startswith("first_stage_model.")}
    save_file(vae, str(tmp_path / "sdxl-vae-fix.safetensors"))
    out = tmp_path / "vae"
    assert _script("txt2img", ["--ckpt", str(base), "--vae", str(tmp_path / "sdxl-vae-fix.safetensors"),
                               "--prompt", "a cat", *_common(out, steps=2)]) == 0
    files, params = _parameters(out)
    assert "VAE: sdxl-vae-fix" in params
    out2 = tmp_path / "refine-only"  # the refiner alone is an img2img model (as the original's demo uses it)
    assert _script("img2img", ["--ckpt", str(tiny["refiner"][1]), "--init-img", str(files[0]), "--strength", "0.3",
                               "--prompt", "a cat", *_common(out2, steps=4)]) == 0
    assert len(_parameters(out2)[0]) == 1


def test_python_api_refuses_a_refiner_as_base_and_a_bad_refiner_before_any_work(tiny):
    from ldm.api import Generator

    refiner = Generator.load(tiny["refiner"][1], device="cpu")
    with pytest.raises(UsageError, match="is an SDXL refiner"):
        refiner.txt2img("a cat", width=32, height=32, steps=2)
    base = Generator.load(tiny["base"][1], device="cpu")
    with pytest.raises(UsageError, match="is an SDXL base model"):
        base.txt2img("a cat", width=32, height=32, steps=2, sdxl=sdxl.SdxlOptions(refiner=str(tiny["base"][1])))
    with pytest.raises(UsageError, match="is an SDXL base model"):  # inpainting checks its refiner too
        base.inpaint(Image.new("RGB", (32, 32)), Image.new("L", (32, 32), 255), "a cat", steps=2,
                     sdxl=sdxl.SdxlOptions(refiner=str(tiny["base"][1])))


# --- inpainting with an SDXL model (the unmasked latents kept at every step, as for regular SD models) ---------------

def _canvas(mask_box=(0, 0, 16, 32), size=32, blur=0):
    from ldm.inference import inpaint

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, mask_box)
    return image, mask, inpaint.build_canvas(image, mask, inpaint.InpaintOptions(mask_blur=blur), size, size, 1024)


def test_inpainting_keeps_the_unmasked_latents_whatever_the_prompt(base_engine):
    _, _, canvas = _canvas()
    s = _settings("inpaint", steps=4, strength=1.0, canvas=canvas)
    session = sdxl_session.SdxlSession(base_engine, s, "cpu", 4, 2)
    keep = session.prepared.keep  # [1, 1, 16, 16]: 1 on the right half of the latent (the unmasked pixels)
    assert keep.shape == (1, 1, 16, 16) and keep[..., :8].sum() == 0 and keep[..., 8:].min() == 1
    cat, dog = session.latents(["a cat"], _gens(1)), session.latents(["a dog"], _gens(1))
    right, left = keep.bool().expand_as(cat), ~keep.bool().expand_as(cat)
    assert torch.allclose(cat[right], dog[right], atol=1e-5)  # kept: the input's latents, not the prompt's
    assert not torch.allclose(cat[left], dog[left], atol=1e-3)  # repainted: each prompt its own
    other_seed = session.latents(["a cat"], _gens(1, seed=9))
    assert not torch.allclose(cat[left], other_seed[left], atol=1e-3)
    free = sdxl_session.SdxlSession(base_engine, _settings(steps=4), "cpu", 4, 2).latents(["a cat"], _gens(1))
    assert not torch.allclose(cat[right], free[right], atol=1e-3)  # txt2img does not keep them
    assert session.steps_per_image == 4
    partial = sdxl_session.SdxlSession(base_engine, _settings("inpaint", steps=4, strength=0.5, canvas=canvas),
                                       "cpu", 4, 2)
    assert partial.steps_per_image == 3 and torch.isfinite(partial.latents(["a cat"], _gens(1))).all()
    with pytest.raises(UsageError, match="mask"):
        sdxl_session.SdxlSession(base_engine, _settings("inpaint", steps=4), "cpu", 4, 2)


def test_inpainting_refiner_hand_off_keeps_the_unmasked_latents_too(tiny, base_engine):
    _, _, canvas = _canvas()
    refiner = build(*tiny["refiner"])
    s = _settings("inpaint", steps=4, strength=1.0, canvas=canvas, options=sdxl.SdxlOptions(refiner_switch=0.5))
    session = sdxl_session.SdxlSession(base_engine, s, "cpu", 4, 2, load_refiner=lambda: refiner)
    calls = _Recorder(refiner)
    cat, dog = session.latents(["a cat"], _gens(1)), session.latents(["a dog"], _gens(1))
    keep = session.prepared.keep.bool().expand_as(cat)
    assert calls.calls > 0 and torch.allclose(cat[keep], dog[keep], atol=1e-5)
    session.close()


def test_inpaint_script_and_api_take_an_sdxl_checkpoint(tiny, tmp_path):
    from ldm.api import Generator

    image, mask, _ = _canvas()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    _, ckpt = tiny["base"]
    out = tmp_path / "inpainted"
    assert _script("inpaint", ["--ckpt", str(ckpt), "--init-img", str(tmp_path / "in.png"), "--mask",
                               str(tmp_path / "mask.png"), "--mask_blur", "0", "--prompt", "a cat",
                               *_common(out, steps=3)]) == 0
    files, params = _parameters(out)
    assert len(files) == 1 and "Mask blur: 0" in params and "Denoising strength: 0.75" in params  # regular model
    result = np.asarray(Image.open(files[0]).convert("RGB"))
    source = np.asarray(image)
    assert np.array_equal(result[:, 16:], source[:, 16:])  # outside the mask: the input's pixels
    assert not np.array_equal(result[:, :16], source[:, :16])  # inside: repainted
    gen = Generator.load(ckpt, device="cpu")
    api = gen.inpaint(image, mask, "a cat", width=32, height=32, steps=3, seed=5, mask_blur=0, strength=0.75)
    assert np.array_equal(np.asarray(api.images[0]), result)  # the script's pixels, through the Python API
    out2 = tmp_path / "outpainted"
    assert _script("inpaint", ["--ckpt", str(ckpt), "--init-img", str(tmp_path / "in.png"), "--outpaint",
                               "8,0,0,0", "--prompt", "a cat", *_common(out2, steps=2)]) == 0
    assert Image.open(_parameters(out2)[0][0]).size == (40, 32)

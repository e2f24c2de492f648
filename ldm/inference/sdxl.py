"""SDXL generation (Stability-AI's ``sgm`` ``DiffusionEngine``, base and refiner): the conditioning batch, guided
sampling through :mod:`ldm.samplers`, img2img, the refiner hand-off's schedule split and decoding in float32 (a
request's session and the API hooks: :mod:`ldm.inference.sdxl_session`).

Conventions of the original (``sgm.inference.helpers.get_batch``): ``original_size_as_tuple`` and
``target_size_as_tuple`` are (height, width), ``crop_coords_top_left`` is (top, left), all int64 [B, 2]; the
refiner reads ``aesthetic_score`` [B, 1] (the unconditional batch ``negative_aesthetic_score``). With an empty
negative prompt the unconditional text embeddings are zeros (``force_uc_zero_embeddings=["txt"]``, as the
original); a negative prompt is encoded instead (as diffusers does). The default sampling is the original's:
the legacy DDPM grid (``legacy_ddpm`` schedule), Euler from ``randn * sqrt(1 + sigma_0^2)``, guidance with the
unconditional half first, sigma quantised by the model's denoiser.
"""
from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from ldm import samplers
from ldm.inference.errors import UsageError
from ldm.models.diffusion.guidance import concat_conditioning
from ldm.samplers.noise import draw
from ldm.samplers.run import img2img_sigmas

logger = logging.getLogger(__name__)

SDXL = "sdxl"  # the model kind (ldm.api.LoadedModel.kind)
ENGINE_CLASS = "DiffusionEngine"
DEFAULT_PIXELS = 1024  # SDXL's training size: the default output side
DEFAULT_SAMPLER = "euler"
DEFAULT_SCHEDULE = "legacy_ddpm"  # sgm's LegacyDDPMDiscretization
AESTHETIC_KEY = "aesthetic_score"
Cond = dict[str, torch.Tensor]


@dataclass(frozen=True)
class SdxlOptions:
    """The SDXL-only settings: size/crop conditioning, the refiner's aesthetic scores and the hand-off."""

    original_size: Optional[tuple[int, int]] = None  # (width, height); None: the output size
    crop: tuple[int, int] = (0, 0)  # (top, left)
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    refiner: Optional[Path] = None
    refiner_switch: float = 0.8


def is_sdxl_config(config: Any) -> bool:
    """True when ``config`` builds an SDXL ``DiffusionEngine`` (``sgm.models.diffusion.DiffusionEngine``)."""
    model = config.get("model") if isinstance(config, Mapping) or hasattr(config, "get") else None
    target = str(model.get("target", "")) if model is not None else ""
    return target.rsplit(".", 1)[-1] == ENGINE_CLASS


def embedder_keys(config: Any) -> list[str]:
    """The batch keys the config's conditioner reads (``txt``, ``original_size_as_tuple`` ...)."""
    params = config.model.get("params") or {}
    emb = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    return [str(e.get("input_key")) for e in emb if e.get("input_key") is not None]


def is_refiner_config(config: Any) -> bool:
    """True for a refiner config (its conditioner reads ``aesthetic_score``)."""
    return AESTHETIC_KEY in embedder_keys(config)


def geometry(config: Any, path: Path) -> Any:
    """The ``ModelGeometry`` of an SDXL config (latent channels, factor, 1024 px default, 1000 timesteps)."""
    from ldm.inference.loading import ModelGeometry

    params = config.model.get("params") or {}
    try:
        first = params["first_stage_config"]["params"]
        factor = 2 ** (len(first["ddconfig"]["ch_mult"]) - 1)
        channels = int(first.get("embed_dim", first["ddconfig"]["z_channels"]))
    except (KeyError, TypeError):
        raise UsageError(f"config '{path}' has no first_stage_config with a ddconfig: not an SDXL model "
                         f"config") from None
    timesteps = int(((params.get("denoiser_config") or {}).get("params") or {}).get("num_idx", 1000))
    return ModelGeometry(channels=channels, factor=factor, latent_size=DEFAULT_PIXELS // factor,
                         timesteps=timesteps, text_encoder="GeneralConditioner")


def check_role(config: Any, path: Path, mode: str, refiner: Optional[Path]) -> None:
    """UsageError for a refiner given as the base of txt2img (it only finishes pictures)."""
    if mode == "txt2img" and is_refiner_config(config):
        raise UsageError(f"'{path}' is an SDXL refiner: it only finishes the pictures of a base model. Pass an "
                         f"SDXL base checkpoint with --ckpt and this file with --refiner (or use it with img2img)")
    if refiner is not None and is_refiner_config(config):
        raise UsageError("--ckpt is already an SDXL refiner; --refiner needs an SDXL base checkpoint as --ckpt")


def default_options(sampler: Optional[str], schedule: Optional[str]) -> tuple[str, Optional[str]]:
    """(sampler, schedule) for SDXL: the original's Euler on the legacy DDPM grid when no sampler was chosen."""
    if sampler is None:
        return DEFAULT_SAMPLER, schedule or DEFAULT_SCHEDULE
    return sampler, schedule


def batches(keys: Sequence[str], prompts: Sequence[str], negative: Sequence[str], width: int, height: int,
            opts: SdxlOptions) -> tuple[dict[str, Any], dict[str, Any]]:
    """(batch, batch_uc) of the original's ``get_batch`` for the conditioner's ``keys`` and B prompts."""
    n = len(prompts)
    orig_w, orig_h = opts.original_size or (width, height)
    values = {"original_size_as_tuple": (orig_h, orig_w), "crop_coords_top_left": tuple(opts.crop),
              "target_size_as_tuple": (height, width)}
    batch: dict[str, Any] = {}
    batch_uc: dict[str, Any] = {}
    for key in keys:
        if key == "txt":
            batch["txt"], batch_uc["txt"] = list(prompts), list(negative)
        elif key == AESTHETIC_KEY:
            batch[key] = torch.full((n, 1), float(opts.aesthetic_score))
            batch_uc[key] = torch.full((n, 1), float(opts.negative_aesthetic_score))
        elif key in values:
            batch[key] = torch.tensor(values[key], dtype=torch.int64).repeat(n, 1)
        else:
            raise UsageError(f"the SDXL conditioner reads '{key}', which this generation cannot provide")
    for key, value in batch.items():
        if key not in batch_uc and torch.is_tensor(value):
            batch_uc[key] = value.clone()
    return batch, batch_uc


def conditioning(engine: Any, prompts: Sequence[str], negative_prompt: str, width: int, height: int,
                 opts: SdxlOptions, embeddings: Optional[Path] = None) -> tuple[Cond, Cond]:
    """(c, uc) {"crossattn": [B, k * 77, D], "vector": [B, V]} of B prompts in the web UI's syntax (75-token
    chunks, weights, BREAK, textual-inversion names with ``clip_l`` / ``clip_g`` vectors; pooled from the first
    chunk). uc's text parts are zeros when the negative prompt is empty (the original), else its encoding.

    For plain prompts of up to 75 tokens this is exactly the original conditioner's result.
    """
    conditioner = engine.conditioner
    keys = list(dict.fromkeys(e.input_key for e in conditioner.embedders if e.input_key is not None))
    batch, batch_uc = batches(keys, prompts, [negative_prompt] * len(prompts), width, height, opts)
    texts = list(dict.fromkeys(list(prompts) + ([negative_prompt] if negative_prompt else [])))
    encoded = _encode_texts(conditioner, texts, embeddings)
    parts_c: list[torch.Tensor] = []
    parts_uc: list[torch.Tensor] = []
    for n, embedder in enumerate(conditioner.embedders):
        if n in encoded:
            for out in encoded[n]:
                rows = out[[texts.index(t) for t in prompts]]
                parts_c.append(rows)
                parts_uc.append(out[[texts.index(negative_prompt)] * len(prompts)] if negative_prompt
                                else torch.zeros_like(rows))
        else:
            key = embedder.input_key
            parts_c.append(embedder(batch[key].to(conditioner.device)))
            parts_uc.append(embedder(batch_uc[key].to(conditioner.device)))
    return _assemble(parts_c), _assemble(parts_uc)


def _assemble(parts: Sequence[torch.Tensor]) -> Cond:
    """The conditioner's sorting: 3-dim outputs concatenated on the features (crossattn), 2-dim on dim 1 (vector)."""
    out: Cond = {}
    for emb in parts:
        key, dim = ("crossattn", 2) if emb.dim() == 3 else ("vector", 1)
        out[key] = torch.cat((out[key], emb), dim) if key in out else emb
    return out


def _text_part(embedder: Any) -> str:
    """Which vectors of an SDXL embedding file an embedder reads: ``clip_g`` (OpenCLIP) or ``clip_l``."""
    return "clip_g" if hasattr(embedder, "model") else "clip_l"


def _encode_texts(conditioner: Any, texts: Sequence[str], folder: Optional[Path]) -> dict[int, list[torch.Tensor]]:
    """Per text embedder: [features [U, k * 77, w]] (+ [pooled [U, d]]) of U texts, all with the same k chunks."""
    from ldm.modules.encoders.prompt_chunks import empty_chunk, encode_chunks, place_vectors
    from ldm.modules.encoders.textual_inversion import EmbeddingError, EmbeddingPart, library_for

    text = [(n, e) for n, e in enumerate(conditioner.embedders) if e.input_key == "txt"]
    try:
        chunks = {n: [e.prompt_chunks(t, EmbeddingPart(library_for(e, folder), _text_part(e))) for t in texts]
                  for n, e in text}
        count = max(len(c) for lists in chunks.values() for c in lists)
        out: dict[int, list[torch.Tensor]] = {}
        for n, embedder in text:
            spec = embedder.chunk_spec()
            padded = [c + [empty_chunk(spec)] * (count - len(c)) for c in chunks[n]]
            out[n] = [encode_chunks(embedder, padded, spec)]
            if getattr(embedder, "return_pooled", False):
                first = [c[0] for c in padded]
                tokens = torch.tensor([c.tokens for c in first], dtype=torch.long, device=embedder.device)
                vectors = [c.vectors for c in first]
                embeds = place_vectors(embedder.model.token_embedding(tokens), vectors) if any(vectors) else None
                out[n].append(embedder.encode_tokens_with_pooled(tokens, embeds)[1])
    except EmbeddingError as e:
        raise UsageError(str(e)) from None
    return out


class EngineDenoiser:
    """``D(x, sigma, cond)`` of an SDXL engine with classifier-free guidance (one batched pass, uncond first), in
    the shape :mod:`ldm.samplers` expects (``alphas_cumprod`` of the denoiser's own sigmas, ``bind``)."""

    def __init__(self, engine: Any, uncond: Optional[Cond], scale: float) -> None:
        self.engine, self.uncond, self.scale = engine, uncond, float(scale)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """alpha_bar [T] (float64) of the denoiser's sigmas: 1 / (1 + sigma^2)."""
        sigmas = self.engine.denoiser.sigmas.detach().to("cpu", torch.float64)
        return 1.0 / (1.0 + sigmas * sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Denoised x [B, C, h, w] at levels sigma [B]."""
        engine = self.engine
        s = sigma.reshape(-1).to(device=x.device, dtype=torch.float32)
        if self.uncond is None or self.scale == 1.0:
            return engine.denoiser(engine.model, x, s, cond).to(x.dtype)
        out = engine.denoiser(engine.model, torch.cat([x, x]), torch.cat([s, s]),
                              concat_conditioning(self.uncond, cond))
        out_uc, out_c = out.to(x.dtype).chunk(2)
        return out_uc + self.scale * (out_c - out_uc)

    def bind(self, cond: Cond) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """``D(x, sigma)`` with the conditioning fixed."""
        return lambda x, sigma: self(x, sigma, cond)


def schedule(engine: Any, choice: samplers.SamplerChoice, steps: int, strength: Optional[float] = None
             ) -> torch.Tensor:
    """The run's sigmas (descending): the chosen schedule on the engine's own levels, img2img's tail at
    ``strength`` (None or >= 1: all of them)."""
    sigmas = samplers.sigmas_for(choice, EngineDenoiser(engine, None, 1.0).alphas_cumprod, steps)
    return img2img_sigmas(sigmas, strength) if strength is not None and 0 < strength < 1 else sigmas


def vp_start(choice: samplers.SamplerChoice) -> bool:
    """True when the start noise is scaled by sqrt(1 + sigma_0^2) (the original SDXL Euler, DDIM, PLMS ...)."""
    return choice.spec.vp_start or choice.schedule == DEFAULT_SCHEDULE


def split(sigmas: torch.Tensor, switch: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(base part, refiner part) of a schedule: the base runs the first ``round(switch * n)`` of its n steps (at
    least one, at most n - 1); the refiner continues from the last level of the base part."""
    n = len(sigmas) - 1
    if n < 2:
        raise UsageError(f"--refiner needs at least 2 sampling steps to share (this run has {n}): raise --steps")
    k = min(max(int(round(switch * n)), 1), n - 1)
    return sigmas[:k + 1], sigmas[k:]


def finish(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Latents from the sampler's result at ``sigmas[-1]`` (the DDIM grids end at sigma_0, not 0)."""
    last = float(sigmas[-1])
    return x / math.sqrt(1.0 + last * last) if last > 0 else x


def _vae_float32(engine: Any, vae_given: bool) -> Any:
    """The engine's autoencoder, turned float32 for good when it was half and no ``--vae`` was given (the SDXL
    VAE overflows in float16)."""
    vae = engine.first_stage_model
    if not vae_given and next(vae.parameters()).dtype != torch.float32:
        vae.float()
    return vae


def encode(engine: Any, image: torch.Tensor, vae_given: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [1, C, h, w] float32 of the autoencoder posterior of an image [1, 3, H, W] in [-1, 1]."""
    vae = _vae_float32(engine, vae_given)
    dtype = next(vae.parameters()).dtype
    with torch.autocast(image.device.type, enabled=False):
        posterior = vae.encode(image.to(dtype))
    return posterior.mean.float(), posterior.std.float()


def start(posterior: Optional[tuple[torch.Tensor, torch.Tensor]], scale_factor: float, sigmas: torch.Tensor,
          gens: Sequence[torch.Generator], shape: Sequence[int], device: Any, vp: bool,
          img2img: bool) -> torch.Tensor:
    """x at ``sigmas[0]``: each image's first draw is its noise; img2img's second its posterior sample."""
    noise = draw(gens, shape, device)
    if not img2img:
        return _noise_start(noise, sigmas, vp)
    return posterior_sample(posterior, scale_factor, gens) + noise * float(sigmas[0])


def _noise_start(noise: torch.Tensor, sigmas: torch.Tensor, vp: bool) -> torch.Tensor:
    s0 = float(sigmas[0])
    return noise * (math.sqrt(1.0 + s0 * s0) if vp else s0)


def posterior_sample(posterior: tuple[torch.Tensor, torch.Tensor], scale_factor: float,
                     gens: Sequence[torch.Generator]) -> torch.Tensor:
    """Scaled latents [B, C, h, w] of the posterior (mean, std) [1, C, h, w]: one draw of each generator."""
    mean, std = posterior
    return scale_factor * (mean + std * draw(gens, mean.shape[1:], mean.device))


def inpaint_start(posterior: tuple[torch.Tensor, torch.Tensor], scale_factor: float, sigmas: torch.Tensor,
                  gens: Sequence[torch.Generator], shape: Sequence[int], device: Any, vp: bool,
                  partial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(x at ``sigmas[0]``, the known latents) of inpainting with a regular model: each image's first draw is its
    noise, its second the input's posterior sample (the kept region, also when the start is pure noise)."""
    noise = draw(gens, shape, device)
    known = posterior_sample(posterior, scale_factor, gens)
    return (known + noise * float(sigmas[0]) if partial else _noise_start(noise, sigmas, vp)), known


def free(engine: Any) -> None:
    """Release a model's memory (weights on the CPU, caches emptied)."""
    engine.to("cpu")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@torch.no_grad()
def decode(engine: Any, latents: torch.Tensor, reduced: bool, vae_given: bool) -> torch.Tensor:
    """Images [B, 3, H, W] float32 in [0, 1]. The SDXL VAE overflows in float16: it decodes in float32 unless a
    ``--vae`` (e.g. the fp16-fixed one) is given, and a half-precision NaN result is redone in float32."""
    vae = _vae_float32(engine, vae_given)
    half = next(vae.parameters()).dtype != torch.float32
    x = engine.decode_first_stage(latents.to(next(vae.parameters()).dtype))
    if not torch.isfinite(x).all() and (half or reduced):
        logger.warning("decoding in half precision gave NaN/inf values; decoding again in float32")
        vae.float()
        with torch.autocast(latents.device.type, enabled=False):
            x = engine.decode_first_stage(latents.float())
    from ldm.inference.limits import check_finite

    check_finite(x, "the decoded images", reduced=False)
    return torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)

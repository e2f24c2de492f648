"""Generation maths for the scripts: batches and per-image seeds, conditioning, sampling, decoding to images.

Every image ``k`` has its own seed and ``torch.Generator`` (on the CPU, so the noise is the same on every device):
its first draw is the starting noise (txt2img ``x_T``, img2img's forward noise), its second the autoencoder
posterior sample (img2img), later draws a stochastic sampler's fresh noise
(or the seed of its Brownian tree). An image therefore depends on its own seed only
and can be made again alone with ``--seed <its seed> --n_samples 1`` (identical up to the float rounding that
differs between batch sizes, a level or two out of 255 at most; the same run on the same device is bit-identical).
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm import samplers
from ldm.inference.errors import UsageError
from ldm.models.diffusion.denoiser import ModelDenoiser
from ldm.samplers import SamplerChoice, SigmaDenoiser, StepInfo
from ldm.samplers.denoiser import guided
from ldm.samplers.noise import draw

logger = logging.getLogger(__name__)

StepCallback = Optional[Callable[[StepInfo], Any]]  # called after every sampler step


@dataclass(frozen=True)
class Job:
    """One sampling batch: a prompt and a seed per image."""

    prompts: tuple[str, ...]
    seeds: tuple[int, ...]


def plan_jobs(prompts: Sequence[str], n_samples: int, n_iter: int, seed: int, repeat: int = 1,
              fixed_code: bool = False, batch_of_copies: bool = True) -> list[Job]:
    """Batches of the run: each iteration renders every batch; image k of the run gets seed ``seed + k``.

    ``batch_of_copies``: one prompt fills whole batches of ``n_samples`` (``--prompt``); otherwise every prompt
    (repeated ``repeat`` times) is one image and the list is cut into batches, the last one possibly smaller
    (``--from-file``). ``fixed_code`` gives position j of every batch the seed ``seed + j`` (same start noise).
    """
    if batch_of_copies:
        chunks = [tuple(prompt for prompt in prompts for _ in range(n_samples))]
    else:
        flat = [p for p in prompts for _ in range(repeat)]
        chunks = [tuple(flat[i:i + n_samples]) for i in range(0, len(flat), n_samples)]
    jobs, k = [], 0
    for _ in range(n_iter):
        for chunk in chunks:
            seeds = tuple(seed + j for j in range(len(chunk))) if fixed_code else tuple(range(seed + k,
                                                                                            seed + k + len(chunk)))
            jobs.append(Job(chunk, seeds))
            k += len(chunk)
    return jobs


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@dataclass(frozen=True)
class Precision:
    """Autocast settings: ``dtype`` None runs in float32."""

    device_type: str
    dtype: Optional[torch.dtype] = None

    @property
    def reduced(self) -> bool:
        """True when computations run in half precision."""
        return self.dtype is not None

    def scope(self) -> contextlib.AbstractContextManager:
        """Context in which the model runs (autocast or nothing)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def choose_precision(device: str, precision: str, bf16: bool) -> Precision:
    """float16 autocast on GPUs for ``autocast``, bfloat16 with ``bf16``; float32 on CPUs unless ``bf16``."""
    device_type = torch.device(device).type
    if bf16:
        if device_type == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise UsageError("--bf16: this GPU does not support bfloat16; drop --bf16 (float16 autocast is used)")
        return Precision(device_type, torch.bfloat16)
    if precision == "full":
        return Precision(device_type)
    if device_type == "cpu":
        logger.info("running in float32 on the CPU (pass --bf16 for bfloat16 autocast)")
        return Precision(device_type)
    return Precision(device_type, torch.float16)


def warn_truncated(model: Any, prompts: Sequence[str], warned: set) -> None:
    """Log once per prompt: how many 75-token chunks a long prompt takes, or (for an encoder that cannot chunk)
    the words it drops past its token limit."""
    encoder = getattr(model, "cond_stage_model", None)
    for prompt in dict.fromkeys(prompts):
        if prompt in warned:
            continue
        warned.add(prompt)
        if _chunks_prompts(model):
            chunks = len(encoder.prompt_chunks(prompt, _embeddings(encoder)))
            if chunks > 1:
                logger.info("long prompt: encoded as %d chunks of %d tokens (%d positions): \"%s\"", chunks,
                            encoder.chunk_spec().length, chunks * (encoder.chunk_spec().length + 2), prompt)
            continue
        dropped = encoder.dropped_words(prompt) if callable(getattr(encoder, "dropped_words", None)) else ""
        if dropped:
            limit = getattr(encoder, "max_length", 77)
            logger.warning("prompt longer than the text encoder's %d tokens; these words are ignored: \"%s\"",
                           limit, dropped)


def _chunks_prompts(model: Any) -> bool:
    """True when the model's text encoder takes long, weighted prompts (``encode_prompts``)."""
    encoder = getattr(model, "cond_stage_model", None)
    return (getattr(model, "cond_stage_forward", None) is None and callable(getattr(encoder, "encode_prompts", None))
            and bool(getattr(encoder, "supports_prompt_chunks", False)))


def _embeddings(encoder: Any) -> Any:
    """The textual-inversion embeddings (``models/embeddings/``) that prompts can name by their file names."""
    from ldm.modules.encoders.textual_inversion import library_for

    return library_for(encoder)


def effective_clip_skip(model: Any, clip_skip: int) -> int:
    """The web UI's "Clip skip" this model's text encoder takes: ``clip_skip`` (1: the last layer), or 1 with a
    warning for encoders without it (SD 2's OpenCLIP and SDXL, as the web UI ignores it there); UsageError when
    it counts more layers than the encoder has."""
    if clip_skip <= 1:
        return 1
    layers = getattr(getattr(model, "cond_stage_model", None), "clip_skip_layers", 0)
    if not layers:
        logger.warning("clip skip %d has no effect on this model's text encoder (only SD 1's CLIP text encoder "
                       "has it, as in the web UI): using its usual layer", clip_skip)
        return 1
    if clip_skip > layers:
        raise UsageError(f"clip skip {clip_skip} is more than the text encoder's {layers} layers: use 1 to {layers} "
                         f"(2 is the usual choice)")
    return clip_skip


@contextlib.contextmanager
def clip_skip(model: Any, value: int) -> Iterator[None]:
    """Encode prompts with ``value`` (from :func:`effective_clip_skip`) as the text encoder's "Clip skip" inside
    the block; the encoder's own setting is back afterwards."""
    encoder = getattr(model, "cond_stage_model", None)
    if value <= 1 or not hasattr(encoder, "clip_skip"):
        yield
        return
    before, encoder.clip_skip = encoder.clip_skip, value
    try:
        yield
    finally:
        encoder.clip_skip = before


def conditioning(model: Any, job: Job, negative_prompt: str, scale: float,
                 warned: set) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(cond, uncond) [B, k * 77, width] for a job; uncond (the negative prompt) is None when scale is 1.

    Prompts are read in the web UI's syntax (long prompts in 75-token chunks, ``(weights)``, ``BREAK``, embedding
    file names); every text of the job is encoded in one text-encoder call and padded to the same number of chunks
    k, so cond and uncond fit into one guidance batch. Each distinct text (a batch repeats its prompt; the negative
    prompt serves every image) is encoded once and the rows are gathered from there. A textual-inversion embedding
    named in a prompt that cannot be used (corrupt, made for another model family) is a ``UsageError``.
    """
    from ldm.modules.encoders.textual_inversion import EmbeddingError

    texts = list(job.prompts) + ([negative_prompt] if scale != 1.0 else [])
    unique = list(dict.fromkeys(texts))
    try:
        warn_truncated(model, list(job.prompts) + ([negative_prompt] if negative_prompt else []), warned)
        if _chunks_prompts(model):
            encoded = model.cond_stage_model.encode_prompts(unique, _embeddings(model.cond_stage_model))
        else:
            encoded = model.get_learned_conditioning(unique)
    except EmbeddingError as e:
        raise UsageError(str(e)) from None
    if not torch.is_tensor(encoded) or encoded.shape[0] != len(unique):  # not a row-per-text conditioning
        cond = model.get_learned_conditioning(list(job.prompts))
        uncond = model.get_learned_conditioning(len(job.prompts) * [negative_prompt]) if scale != 1.0 else None
        return cond, uncond

    def rows(chosen: Sequence[str]) -> torch.Tensor:
        return encoded.index_select(0, torch.tensor([unique.index(t) for t in chosen], device=encoded.device))
    return rows(job.prompts), rows(len(job.prompts) * [negative_prompt]) if scale != 1.0 else None


def guided_denoiser(model: Any, uncond: Optional[torch.Tensor], scale: float) -> SigmaDenoiser:
    """The model as the samplers see it: D(x, sigma, cond) with classifier-free guidance (uncond first)."""
    return guided(ModelDenoiser(model), uncond, scale)


def sampler_steps(model: Any, choice: SamplerChoice, steps: int, strength: Optional[float] = None) -> int:
    """Sampler steps one image takes (DDIM grids can have more than ``steps``, as the original's; img2img fewer)."""
    if strength is None:
        return len(samplers.sigmas_for(choice, model.alphas_cumprod, steps)) - 1
    return samplers.img2img_steps(choice, model.alphas_cumprod, steps, strength)


@torch.inference_mode()
def sample_txt2img(model: Any, choice: SamplerChoice, x_T: torch.Tensor, cond: torch.Tensor,
                   uncond: Optional[torch.Tensor], steps: int, scale: float, gens: Sequence[torch.Generator],
                   eta: Optional[float] = None, callback: StepCallback = None) -> torch.Tensor:
    """Latents [B, C, h, w] from the start noise x_T [B, C, h, w] in ``steps`` steps of the chosen sampler; fresh
    noise comes from each image's own generator (inference mode)."""
    return samplers.sample(choice, guided_denoiser(model, uncond, scale), x_T, steps, cond, eta=eta,
                           gens=list(gens), callback=callback)


def encode_init(model: Any, init: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) [1, C, h, w] of the autoencoder posterior of an image [1, 3, H, W] in [-1, 1]."""
    posterior = model.encode_first_stage(init)
    return posterior.mean, posterior.std


@torch.inference_mode()
def sample_img2img(model: Any, choice: SamplerChoice, posterior: tuple[torch.Tensor, torch.Tensor],
                   cond: torch.Tensor, uncond: Optional[torch.Tensor], steps: int, strength: float, scale: float,
                   gens: Sequence[torch.Generator], eta: Optional[float] = None,
                   callback: StepCallback = None) -> torch.Tensor:
    """Latents [B, C, h, w]: the init latents noised to the level ``strength`` picks from the full schedule of
    ``steps`` sigmas and denoised again (the web UI's convention, every sampler).

    Each image draws its start noise, then its posterior sample. strength 0 returns the init latents themselves;
    strength 1 is txt2img for the same seed (the init image gives only the size).
    """
    mean, std = posterior
    noise = draw(gens, mean.shape[1:], mean.device)
    if strength >= 1:  # txt2img from the same noise, and the same later draws
        return sample_txt2img(model, choice, noise, cond, uncond, steps, scale, gens, eta, callback)
    z0 = model.scale_factor * (mean + std * draw(gens, mean.shape[1:], mean.device))
    return samplers.sample(choice, guided_denoiser(model, uncond, scale), noise, steps, cond, init=z0,
                           strength=strength, eta=eta, gens=list(gens), callback=callback)


@torch.inference_mode()
def decode(model: Any, latents: torch.Tensor, precision: Precision) -> torch.Tensor:
    """Images [B, 3, H, W] float32 in [0, 1] from latents; a half-precision NaN/inf result is redone in float32
    (with the autoencoder's weights upcast to float32 for good when they were half: the fast path)."""
    with precision.scope():
        x = model.decode_first_stage(latents)
    if precision.reduced and not torch.isfinite(x).all():
        logger.warning("decoding in %s gave NaN/inf values; decoding again in float32",
                       str(precision.dtype).replace("torch.", ""))
        _upcast_autoencoder(model)
        with torch.autocast(precision.device_type, enabled=False):
            x = model.decode_first_stage(latents.float())
    from ldm.inference.limits import check_finite

    check_finite(x, "the decoded images", reduced=False)  # an error, never a black picture
    return torch.clamp((x.float() + 1.0) / 2.0, 0.0, 1.0)


def _upcast_autoencoder(model: Any) -> None:
    """Turn a half-precision first stage (``--fast`` casts the weights) into float32 for the rest of the run."""
    vae = getattr(model, "first_stage_model", None)
    param = next(vae.parameters(), None) if isinstance(vae, torch.nn.Module) else None
    if param is not None and param.dtype != torch.float32:
        logger.warning("the autoencoder now runs in float32 (its %s weights overflowed)",
                       str(param.dtype).replace("torch.", ""))
        vae.float()


def to_numpy(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] float in [0, 1] -> numpy [B, H, W, 3] float32."""
    return images.detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float32)


@contextlib.contextmanager
def _own_size_limits() -> Iterator[None]:
    """Pillow's global decompression-bomb check off for a while: the caller applies ``limits`` itself."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _rgb(image: Image.Image) -> Image.Image:
    """RGB version of an image; 16-bit, 32-bit integer and float grey images are scaled to 8 bits first."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        top = float(values.max()) if values.size else 0.0
        if image.mode.startswith("I;16") or 255 < top <= 65535:
            values = values / 257.0  # 16-bit (PNG) range
        elif image.mode == "F" and top <= 1.0:
            values = values * 255.0  # float in [0, 1]
        elif top > 65535:
            values = values * (255.0 / top)
        image = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def load_init_image(path: Any, factor: int, width: Optional[int] = None, height: Optional[int] = None,
                    allow_large: bool = False, resize_mode: int = 0) -> Image.Image:
    """The init image as RGB, resized to ``width x height`` or to its own size cut down to a multiple of factor
    (``resize_mode``: the web UI's, see ``ldm.inference.resize``).

    Its size is checked from the file's header before any pixel is decoded (``limits``; ``allow_large`` skips).
    """
    from ldm.inference import limits

    try:
        with _own_size_limits(), Image.open(path) as image:
            w, h = image.size
            target = (width or w - w % factor, height or h - h % factor)
            if w * h > limits.MAX_READ_PIXELS and not allow_large:
                raise UsageError(f"--init-img '{path}' is {w}x{h} pixels, too large to read (the limit is "
                                 f"{limits.MAX_READ_PIXELS / 1e6:.0f} megapixels): make it smaller first, or pass "
                                 f"{limits.OVERRIDE}")
            limits.check_size(*target, allow_large, what=f"the picture from --init-img '{path}' ({w}x{h})")
            image.load()
            image = _rgb(image)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise UsageError(f"--init-img: cannot read '{path}' as an image ({e}); give a PNG or JPEG file") from None
    if min(target) < factor:
        raise UsageError(f"--init-img '{path}' is {w}x{h} pixels; it needs at least {factor} pixels per side "
                         f"(or pass --W/--H to resize it)")
    if target != (w, h):
        from ldm.inference.resize import RESIZE_MODES, resize_image

        logger.info("init image %dx%d brought to %dx%d (%s)", w, h, *target, RESIZE_MODES[resize_mode].lower())
        image = resize_image(image, *target, resize_mode)
    return image


def image_tensor(image: Image.Image, device: torch.device | str) -> torch.Tensor:
    """PIL RGB image -> [1, 3, H, W] float32 in [-1, 1] on ``device``."""
    array = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].to(device) * 2.0 - 1.0

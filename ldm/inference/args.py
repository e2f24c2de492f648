"""Command-line flags of scripts/txt2img.py and scripts/img2img.py (SD 1 and SD 2 spellings) and their validation."""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from ldm import samplers
from ldm.inference import hires, ranges, sdxl_args
from ldm.inference.resize import resize_mode
from ldm.inference.errors import UsageError, UsageParser
from ldm.samplers.schedules import SCHEDULE_ALIASES, USER_SCHEDULES

PRECISIONS = ("full", "autocast")
COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")
MODES = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class Options:
    """Validated generation settings; ``None`` sizes/channels/factors mean "take them from the model"."""

    mode: str
    prompt: Optional[str]
    from_file: Optional[Path]
    negative_prompt: str
    outdir: Path
    steps: int
    sampler: str  # the short name (ldm.samplers.registry)
    eta: Optional[float]  # None: the sampler's default
    n_iter: int
    n_samples: int
    n_rows: int
    height: Optional[int]
    width: Optional[int]
    latent_channels: Optional[int]
    factor: Optional[int]
    scale: float
    fixed_code: bool
    config: Optional[Path]
    ckpt: Optional[Path]
    vae: Optional[Path]
    use_ema: Optional[bool]
    seed: int
    precision: str
    bf16: bool
    device: str
    skip_grid: bool
    skip_save: bool
    repeat: int
    watermark: bool
    watermark_text: Optional[str]
    safety_check: bool
    safety_checker: Optional[Path]
    init_img: Optional[Path] = None
    strength: float = 0.75
    tiled_vae: Optional[int] = None
    fast: bool = False
    compile: str = "off"
    threads: Optional[int] = None
    unsafe_config: bool = False
    allow_large: bool = False
    schedule: Optional[str] = None  # None: the sampler's default
    inpaint: Optional[Any] = None  # ldm.inference.inpaint.InpaintOptions in the inpaint mode
    loras: tuple = ()  # ldm.modules.lora.LoraSpec of each --lora
    sampler_given: bool = True  # False: no --sampler/--plms/--dpm (SDXL then samples as the original)
    sdxl: Optional[Any] = None  # ldm.inference.sdxl.SdxlOptions (size/crop/aesthetic conditioning, refiner)
    clip_skip: int = 1  # the web UI's "Clip skip"
    hires: Optional[Any] = None  # ldm.inference.hires.HiresOptions (txt2img --hires)
    resize_mode: int = 0  # img2img: ldm.inference.resize's modes

    @property
    def sampler_choice(self) -> samplers.SamplerChoice:
        """The sampler with its schedule."""
        return samplers.resolve(self.sampler, self.schedule)

    @property
    def sampler_label(self) -> str:
        """The sampler's name as the common web UIs write it (``DDIM``, ``Euler a``, ``DPM++ 2M``)."""
        return self.sampler_choice.label


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint (.safetensors or .ckpt) or diffusers model folder; default: the embedded default "
                        "model")
    g.add_argument("--config", type=Path, default=None,
                   help="model config yaml; default: <ckpt>.yaml beside the checkpoint, else inferred from its keys")
    g.add_argument("--vae", type=Path, default=None, help="external autoencoder (VAE) weights to use instead")
    g.add_argument("--lora", action="append", default=None, metavar="PATH[:WEIGHT]",
                   help="merge a LoRA file (kohya/web-UI or diffusers/PEFT) at WEIGHT (default 1; PATH:TE:UNET or "
                        ":te=W:unet=W set the two parts apart); repeatable. Prompts can also name LoRAs in "
                        "models/lora/ with <lora:NAME:WEIGHT>")
    ema = g.add_mutually_exclusive_group()
    ema.add_argument("--use_ema", "--ema", dest="use_ema", action="store_const", const=True, default=None,
                     help="full checkpoints: use the EMA UNet weights (the default when present)")
    ema.add_argument("--no_ema", "--raw_weights", dest="use_ema", action="store_const", const=False,
                     help="full checkpoints: use the raw (non-EMA) UNet weights")
    g.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    g.add_argument("--precision", choices=PRECISIONS, default="autocast",
                   help="autocast: half precision on GPUs (float32 on CPU unless --bf16); full: float32")
    g.add_argument("--bf16", action="store_true", help="use bfloat16 instead of float16 under autocast")
    g.add_argument("--unsafe_config", action="store_true",
                   help="let the config build classes from outside this project (they can run any code); only for "
                        "config files you trust")


def _sampling_flags(p: argparse.ArgumentParser, mode: str) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--ddim_steps", "--steps", dest="steps", type=int, default=50, help="number of sampling steps")
    g.add_argument("--sampler", default=None, metavar="NAME",
                   help='sampler by its web-UI or short name, e.g. "DPM++ 2M Karras", "Euler a", euler, unipc '
                        '(default DDIM); "--sampler help" lists them all')
    g.add_argument("--schedule", "--scheduler", dest="schedule", default=None,
                   choices=USER_SCHEDULES + tuple(SCHEDULE_ALIASES),
                   help="noise schedule: normal (uniform timesteps), karras or exponential (default: the "
                        "sampler's own)")
    g.add_argument("--plms", action="store_true", help="use the PLMS sampler (same as --sampler plms)")
    g.add_argument("--dpm_solver", "--dpm", dest="dpm", action="store_true",
                   help="use the original SD 2 DPM-Solver++ (same as --sampler dpm_solver)")
    g.add_argument("--ddim_eta", "--eta", dest="ddim_eta", type=float, default=None,
                   help="fresh-noise amount of a stochastic sampler: DDIM's eta (default 0), the ancestral and SDE "
                        "samplers' eta (default 1; 0 makes them deterministic)")
    g.add_argument("--scale", type=float, default=5.0 if mode == "img2img" else 7.5,
                   help="classifier-free guidance scale (1: no guidance)")
    g.add_argument("--clip_skip", "--clip-skip", dest="clip_skip", type=int, default=1, metavar="N",
                   help="the web UI's Clip skip: condition on the text encoder's N-th layer from the end (default 1: "
                        "the last; 2 for models trained that way, e.g. many anime fine-tunes; SD 1 models only)")
    g.add_argument("--seed", type=int, default=42, help="seed of the first image; image k uses seed + k")
    g.add_argument("--fixed_code", action="store_true", help="use the same starting noise for every batch")
    g.add_argument("--H", type=int, default=None, help="image height in pixels (default: the model's size)")
    g.add_argument("--W", type=int, default=None, help="image width in pixels (default: the model's size)")
    g.add_argument("--C", type=int, default=None, help="latent channels (default and only valid value: the model's)")
    g.add_argument("--f", type=int, default=None, help="downsampling factor (default and only valid value: the "
                                                         "model's)")
    if mode in ("img2img", "inpaint"):
        g.add_argument("--init-img", "--init_img", dest="init_img", type=Path, default=None,
                       help="the input image (resized to a multiple of the model's factor)")
        g.add_argument("--strength", type=float, default=0.75 if mode == "img2img" else None,
                       help="how much to change the input image: 0 keeps it, 1 replaces it" + (
                           "" if mode == "img2img" else " (default 1 for inpainting models and outpainting, "
                                                        "else 0.75)"))
    if mode == "img2img":
        g.add_argument("--resize_mode", "--resize-mode", dest="resize_mode", default="0", metavar="MODE",
                       help="how the input is brought to --W x --H: 0 / just (stretch, default), 1 / crop (crop and "
                            "resize), 2 / fill (resize and fill with its stretched edges)")


def _prompt_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", default=None, help="the prompt to render")
    g.add_argument("--negative_prompt", "--negative-prompt", default="",
                   help="what the image should not show (the unconditional conditioning)")
    g.add_argument("--from-file", "--from_file", dest="from_file", type=Path, default=None,
                   help="a text file with one prompt per line")
    g.add_argument("--repeat", type=int, default=1, help="with --from-file: render each prompt this often")
    g.add_argument("--n_samples", type=int, default=None, help="images per batch (batch size)")
    g.add_argument("--n_iter", type=int, default=None, help="how many times to run every batch")


def _output_flags(p: argparse.ArgumentParser, mode: str) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--outdir", type=Path, default=Path("outputs") / f"{mode}-samples", help="where to write")
    g.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: n_samples)")
    g.add_argument("--skip_grid", action="store_true", help="do not write the grid of all images")
    g.add_argument("--skip_save", action="store_true", help="do not write the individual images")
    g.add_argument("--no_watermark", action="store_true", help="do not embed the invisible watermark")
    g.add_argument("--watermark_text", default=None,
                   help="watermark payload (default as the originals: StableDiffusionV1 or SDV2)")
    g.add_argument("--no_safety_check", action="store_true", help="switch the NSFW safety checker off")
    g.add_argument("--safety_checker", type=Path, default=None,
                   help="folder with the safety checker (config.json, model.safetensors, preprocessor_config.json)")


def _speed_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speed and memory (applied by ldm.inference.accel)")
    g.add_argument("--tiled_vae", type=int, nargs="?", const=64, default=None, metavar="TILE",
                   help="decode (and encode) the latents in overlapping tiles of TILE latent cells (default 64): "
                        "big images in little memory; each tile's attention is local, a slight approximation")
    g.add_argument("--fast", action="store_true",
                   help="CUDA fast path: half-precision weights, channels_last, SDPA attention, cuDNN autotuning")
    g.add_argument("--compile", choices=COMPILE_MODES, default="off",
                   help="torch.compile the UNet and the VAE decoder on CUDA (reduce-overhead: CUDA graphs); the "
                        "first batch pays the compilation")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, one per core)")
    g.add_argument("--allow_large", action="store_true",
                   help="skip the size and memory limits (images over 16 megapixels, runs over 10,000 images, "
                        "batches estimated not to fit into memory); the run may then fail or take very long")


def build_parser(mode: str) -> argparse.ArgumentParser:
    """The parser of ``scripts/<mode>.py`` (``txt2img`` or ``img2img``) with both SD generations' spellings."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    what = {"txt2img": "images from text", "img2img": "a new image from an input image and text",
            "inpaint": "a new version of the masked part of an image (or a larger canvas) from text"}[mode]
    p = UsageParser(prog=f"{mode}.py", description=f"Generate {what} with a Stable Diffusion style model.")
    _prompt_flags(p)
    _sampling_flags(p, mode)
    _model_flags(p)
    _output_flags(p, mode)
    _speed_flags(p)
    sdxl_args.add_flags(p, mode)
    if mode == "txt2img":
        hires.add_flags(p)
    if mode == "inpaint":
        from ldm.inference.inpaint import add_flags

        add_flags(p)
    return p


def resolve_sampler(sampler: Optional[str], plms: bool, dpm: bool,
                    schedule: Optional[str] = None) -> samplers.SamplerChoice:
    """The sampler (and schedule) from --sampler / --plms / --dpm / --schedule, which must not contradict each
    other; an unknown name is a UsageError that suggests the closest ones."""
    flags = [name for name, flag in (("plms", plms), ("dpm_solver", dpm)) if flag]
    try:
        chosen = [samplers.resolve(name, schedule) for name in flags]
        if sampler is not None:
            chosen.append(samplers.resolve(sampler, schedule))
        if not chosen:
            chosen.append(samplers.resolve("ddim", schedule))
    except samplers.UnknownSampler as e:
        raise UsageError(str(e)) from None
    if len({c.spec.name for c in chosen}) > 1:
        names = ", ".join(sorted(c.spec.name for c in chosen))
        raise UsageError(f"conflicting sampler flags ({names}): choose one sampler")
    return chosen.pop()


def resolve_device(requested: Optional[str]) -> str:
    """The torch device to run on: ``requested`` if usable, else cuda when present, else cpu."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise UsageError(f"invalid --device '{requested}': use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested} asked for, but no CUDA GPU is available: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {requested}: there are only {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {requested} asked for, but MPS is not available: use --device cpu")
    return str(device)


def _check_file(path: Optional[Path], flag: str, what: str) -> Optional[Path]:
    if path is None:
        return None
    path = path.expanduser()
    noun = what if what.endswith("file") else f"{what} file"
    noun = f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"
    if not path.exists():
        raise UsageError(f"{flag}: {what} '{path}' does not exist; check the path")
    if path.is_dir():
        raise UsageError(f"{flag}: '{path}' is a folder, not {noun}; give the file itself")
    if not path.is_file():
        raise UsageError(f"{flag}: '{path}' is not a regular file (a device, pipe or socket), not {noun}; "
                         f"give a file")
    return path


def _lora_specs(values: Optional[Sequence[str]]) -> tuple:
    """--lora values as ``LoraSpec``s (the files must exist)."""
    from ldm.modules.lora import parse_lora_flag

    return tuple(parse_lora_flag(v) for v in values or ())


def _check_ckpt(path: Optional[Path]) -> Optional[Path]:
    """--ckpt: a checkpoint file, or a diffusers model folder (with model_index.json)."""
    from ldm.convert.diffusers_folder import is_diffusers_folder

    if path is not None and is_diffusers_folder(path.expanduser()):
        return path.expanduser()
    return _check_file(path, "--ckpt", "checkpoint")


def _max_threads() -> int:
    return 4 * (os.cpu_count() or 1)


def _check_ranges(ns: argparse.Namespace) -> None:
    ranges.at_least((("--ddim_steps/--steps", ns.steps, 1), ("--n_samples", ns.n_samples, 1),
                     ("--n_iter", ns.n_iter, 1), ("--repeat", ns.repeat, 1), ("--n_rows", ns.n_rows, 0),
                     ("--H", ns.H, 1), ("--W", ns.W, 1), ("--C", ns.C, 1), ("--f", ns.f, 1),
                     ("--tiled_vae", ns.tiled_vae, 1), ("--threads", ns.threads, 1), ("--clip_skip", ns.clip_skip, 1)))
    ranges.guidance_scale("--scale", ns.scale)
    ranges.eta("--ddim_eta", ns.ddim_eta)
    ranges.strength("--strength", ns.strength)
    ranges.seed("--seed", ns.seed)
    if ns.threads is not None and ns.threads > _max_threads():
        raise UsageError(f"--threads {ns.threads} is more than 4 per CPU core ({os.cpu_count()} cores here): use "
                         f"at most {_max_threads()}, or leave it out")


def _check_sampler(ns: argparse.Namespace, choice: samplers.SamplerChoice) -> None:
    if ns.ddim_eta is not None and not choice.spec.stochastic:
        noisy = ", ".join(s.label for s in samplers.SAMPLERS if s.stochastic)
        raise UsageError(f"--ddim_eta/--eta only applies to samplers that add fresh noise ({noisy}); "
                         f"{choice.label} is deterministic: drop it")


def _sampler_help(ns: argparse.Namespace) -> None:
    """``--sampler help``: print the sampler table and exit 0."""
    if ns.sampler is not None and ns.sampler.strip().lower() in ("help", "list", "?"):
        print(samplers.help_table())
        raise SystemExit(0)


def _check_prompt_source(ns: argparse.Namespace) -> None:
    if ns.prompt is not None and ns.from_file is not None:
        raise UsageError("give either --prompt or --from-file, not both")
    if ns.prompt is not None and not ns.prompt.strip():
        raise UsageError("--prompt is empty: write what the image should show")
    if ns.repeat != 1 and ns.from_file is None:
        raise UsageError("--repeat applies to --from-file prompts; use --n_samples/--n_iter for more images of "
                         "one prompt")
    if ns.mode in ("img2img", "inpaint") and ns.init_img is None:
        raise UsageError(f"{ns.mode} needs an input image: pass --init-img PATH")


def parse_options(argv: Optional[Sequence[str]], mode: str) -> Options:
    """Parse and validate the flags of ``scripts/<mode>.py``; raises UsageError naming the problem and the fix."""
    ns = build_parser(mode).parse_args(argv)
    ns.mode = mode
    if mode == "txt2img":
        ns.init_img, ns.strength = None, 0.75
    inpaint = None
    if mode == "inpaint":
        from ldm.inference.inpaint import options_from

        inpaint = options_from(ns, _check_file(ns.mask, "--mask", "image"))
        ns.strength = ns.strength if ns.strength is not None else 1.0
    ns.n_samples = ns.n_samples if ns.n_samples is not None else (3 if mode == "txt2img" else 2)
    ns.n_iter = ns.n_iter if ns.n_iter is not None else (2 if mode == "txt2img" else 1)
    _sampler_help(ns)
    _check_ranges(ns)
    choice = resolve_sampler(ns.sampler, ns.plms, ns.dpm, ns.schedule)
    _check_sampler(ns, choice)
    _check_prompt_source(ns)
    if ns.config is not None and ns.ckpt is None:
        raise UsageError(f"--config {ns.config} given without --ckpt: pass the weights that go with it "
                         f"(--ckpt PATH), or drop --config to use the default model")
    if ns.outdir.exists() and not ns.outdir.is_dir():
        raise UsageError(f"--outdir '{ns.outdir}' exists and is not a folder: choose another --outdir")
    return Options(
        unsafe_config=ns.unsafe_config,
        mode=mode, prompt=ns.prompt, from_file=_check_file(ns.from_file, "--from-file", "prompt file"),
        negative_prompt=ns.negative_prompt, outdir=ns.outdir.expanduser(), steps=ns.steps, sampler=choice.spec.name,
        schedule=choice.schedule, eta=ns.ddim_eta, n_iter=ns.n_iter, n_samples=ns.n_samples, n_rows=ns.n_rows or ns.n_samples,
        height=ns.H, width=ns.W, latent_channels=ns.C, factor=ns.f, scale=ns.scale, fixed_code=ns.fixed_code,
        config=_check_file(ns.config, "--config", "config"), ckpt=_check_ckpt(ns.ckpt),
        vae=_check_file(ns.vae, "--vae", "VAE"), use_ema=ns.use_ema, seed=ns.seed, precision=ns.precision,
        bf16=ns.bf16, device=resolve_device(ns.device), skip_grid=ns.skip_grid, skip_save=ns.skip_save,
        repeat=ns.repeat, watermark=not ns.no_watermark, watermark_text=ns.watermark_text,
        safety_check=not ns.no_safety_check, safety_checker=check_safety_path(ns),
        init_img=_check_file(ns.init_img, "--init-img", "image"), strength=ns.strength, tiled_vae=ns.tiled_vae,
        fast=ns.fast, compile=ns.compile, threads=ns.threads, allow_large=ns.allow_large, inpaint=inpaint,
        loras=_lora_specs(ns.lora), sampler_given=ns.sampler is not None or ns.plms or ns.dpm, clip_skip=ns.clip_skip,
        hires=hires.options_from(ns), resize_mode=resize_mode(getattr(ns, "resize_mode", 0)),
        sdxl=sdxl_args.options_from(ns, _check_file(getattr(ns, "refiner", None), "--refiner", "checkpoint")))


def check_safety_path(ns: argparse.Namespace) -> Optional[Path]:
    """The ``--safety_checker`` folder (None when not given); UsageError when it contradicts --no_safety_check or
    is not a folder."""
    path = ns.safety_checker
    if path is None:
        return None
    if ns.no_safety_check:
        raise UsageError("--safety_checker and --no_safety_check contradict each other: keep one")
    path = path.expanduser()
    if not path.is_dir():
        raise UsageError(f"--safety_checker: folder '{path}' does not exist; point it to the folder with "
                         f"config.json, model.safetensors and preprocessor_config.json")
    return path


def read_prompts(path: Path) -> list[str]:
    """Non-blank lines of a prompt file (stripped); raises UsageError for unreadable or empty files."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"--from-file: '{path}' is not UTF-8 text; save it as plain UTF-8 text, one prompt "
                         f"per line") from None
    except OSError as e:
        raise UsageError(f"--from-file: cannot read '{path}': {e.strerror or e}") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--from-file: '{path}' contains no prompts; write one prompt per line")
    return prompts

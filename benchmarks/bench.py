#!/usr/bin/env python
"""Speed benchmark of ours against diffusers (when installed), side by side in one run; see benchmarks/README.md.

Components: UNet step (SD 1 at 64x64 and SD 2 at 96x96 latents, batch 2 = one image with guidance), VAE decode
to 512x512, whole 50-step txt2img (text encoding, DDIM with guidance, decoding). Random weights at the real
sizes, built from configs/stable-diffusion/; fp16 on CUDA, fp32 on the CPU, where a reduced set runs (UNet
widths / 5, VAE widths / 4, latent sides / 2) unless --full-size. A last line times the embedded default model's
txt2img when it is present; --vae-memory measures the peak memory of plain vs tiled VAE decodes.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("ldm") is None:  # run from a checkout; PYTHONPATH may point to another tree
    sys.path.insert(0, str(ROOT))

from omegaconf import OmegaConf  # noqa: E402

from contenders import (CONFIGS, diffusers_txt2img, diffusers_unet, diffusers_vae, load_default_model,  # noqa: E402
                        ours_txt2img, prepare, sd_params)
from ldm.util import instantiate_from_config  # noqa: E402

logger = logging.getLogger("bench")
DEFAULT_MODEL = ROOT / "models" / "ldm" / "sd-shapes"


@dataclass
class Row:
    """One line of the table."""

    component: str
    impl: str
    ms: Optional[float] = None
    p10: Optional[float] = None
    p90: Optional[float] = None
    flops: Optional[float] = None
    peak_mib: Optional[float] = None
    first_s: Optional[float] = None
    diff: Optional[float] = None
    note: str = ""


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int,
               iters: int) -> tuple[float, list[float], Any]:
    """(first call in s, incl. any compilation; ms of ``iters`` calls after ``warmup - 1`` more; last output)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - start
    for _ in range(max(warmup - 1, 0)):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return first, times, out


def count_flops(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(FLOPs of one eager call counted by torch.utils.flop_counter (matmuls, convolutions, attention), output)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    return float(counter.get_total_flops()), out


def measure(component: str, impl: str, fn: Callable[[], Any], args: argparse.Namespace, flops: Optional[float] = None,
            reference: Optional[torch.Tensor] = None, iters: Optional[int] = None) -> Row:
    """Time ``fn`` (median, p10, p90 after warm-up) and read its peak CUDA memory; compare its output."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        first, times, out = time_calls(fn, device, args.warmup, iters or args.iters)
    quantiles = statistics.quantiles(times, n=10, method="inclusive") if len(times) > 1 else [times[0]] * 9
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    diff = float((out.float() - reference.float()).abs().max()) if reference is not None else None
    return Row(component, impl, statistics.median(times), quantiles[0], quantiles[-1], flops, peak, first, diff)


# ----------------------------------------------------------------------------------------------------- timing --

def graphed(fn: Callable[..., torch.Tensor], args: argparse.Namespace,
            *inputs: torch.Tensor) -> tuple[Callable[[], Any], str]:
    """(``fn(*inputs)`` as a no-argument call, note): replayed from a CUDA graph with --cuda-graphs; when the
    capture fails (e.g. a host-to-device copy inside the forward) the call stays eager and the note says why."""
    if not args.cuda_graphs:
        return (lambda: fn(*inputs)), ""
    from ldm.inference.accel import CudaGraphCall
    try:
        with torch.inference_mode():
            call = CudaGraphCall(fn, *inputs)
    except RuntimeError as e:
        logger.error("CUDA graph capture failed, timing eagerly: %s", e)
        torch.cuda.synchronize()
        return (lambda: fn(*inputs)), f"graph capture failed: {str(e).splitlines()[0][:80]}"
    return (lambda: call(*inputs)), "CUDA graph"


def have_diffusers(args: argparse.Namespace) -> bool:
    """True when diffusers is installed and not switched off."""
    return not args.no_diffusers and importlib.util.find_spec("diffusers") is not None


@dataclass
class Contender:
    """One implementation of a component: how to build it, call it, and which part the options apply to."""

    impl: str
    build: Callable[[], torch.nn.Module]
    call: Callable[..., torch.Tensor]  # call(module, *inputs)
    part: Callable[[torch.nn.Module], torch.nn.Module] = lambda module: module


def run_contender(label: str, c: Contender, inputs: tuple, args: argparse.Namespace) -> Row:
    """Build (random weights, device, dtype), count FLOPs eagerly, apply the options, time; frees the model."""
    module = c.build().to(args.device, args.dtype).eval().requires_grad_(False)
    with torch.inference_mode():
        flops, plain = count_flops(lambda: c.call(module, *inputs))
    prepare(c.part(module), args, ours=c.impl == "ours")
    call, note = graphed(lambda *a: c.call(module, *a), args, *inputs)
    row = measure(label, c.impl, call, args, flops, plain)
    row.note = note
    return row


def compare(label: str, contenders: list[Contender], inputs: tuple, args: argparse.Namespace) -> list[Row]:
    """Rows of ours and (when installed) diffusers for one component, one contender in memory at a time."""
    rows = []
    for contender in [c for c in contenders if c.impl == "ours" or have_diffusers(args)]:
        rows.append(run_contender(label, contender, inputs, args))
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()  # the previous contender's weights are gone before the next one's peak
    return rows


# ------------------------------------------------------------------------------------------------- components --

def bench_unet(args: argparse.Namespace, name: str, latent: int) -> list[Row]:
    """UNet forward at batch 2 (one image with classifier-free guidance), ours and diffusers."""
    params = sd_params(name, args)
    latent //= args.latent_div
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, latent, latent, generator=g).to(args.device, args.dtype)
    c = torch.randn(2, 77, params.unet_config.params.context_dim, generator=g).to(args.device, args.dtype)
    t = torch.tensor([999, 999], device=args.device)
    return compare(f"UNet {'SD1' if 'v1' in name else 'SD2'} {latent}x{latent} b2", [
        Contender("ours", lambda: instantiate_from_config(params.unet_config),
                  lambda m, *a: m(a[0], a[1], context=a[2])),
        Contender("diffusers", lambda: diffusers_unet(params.unet_config.params),
                  lambda m, *a: m(a[0], a[1], encoder_hidden_states=a[2]).sample)], (x, t, c), args)


def bench_vae(args: argparse.Namespace) -> list[Row]:
    """VAE decode of one latent to 512x512 (reduced: 256x256), ours and diffusers."""
    params = sd_params("v1-inference", args)
    latent = 64 // args.latent_div
    z = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(0)).to(args.device, args.dtype)
    return compare(f"VAE decode {latent * 8}x{latent * 8}", [
        Contender("ours", lambda: instantiate_from_config(params.first_stage_config), lambda m, z: m.decode(z),
                  lambda m: m.decoder),
        Contender("diffusers", lambda: diffusers_vae(params.first_stage_config.params.ddconfig),
                  lambda m, z: m.decode(z).sample, lambda m: m.decoder)], (z,), args)


def bench_txt2img(args: argparse.Namespace) -> list[Row]:
    """Whole txt2img of one 512x512 image (reduced: 256x256), ``--steps`` steps of ``--sampler``, guidance
    ``--scale``; diffusers runs the matching scheduler where it has one."""
    from ldm.inference import accel

    latent = 64 // args.latent_div
    label = f"txt2img {latent * 8}x{latent * 8} {args.steps} steps {args.sampler}"
    model, run, last = ours_txt2img(args, latent)
    with torch.inference_mode():  # the plain path (float32 weights, autocast on CUDA), to compare the fast one with
        flops, plain = count_flops(run)
    plain_latents = last["latents"]
    if args.device.startswith("cuda"):
        fast = accel.FastPath(dtype=args.dtype if args.dtype != torch.float32 else None,
                              channels_last=args.channels_last, attention=args.attention,
                              compile_unet=args.compile != "off", compile_vae=args.compile != "off",
                              compile_mode=args.compile if args.compile != "off" else "default")
        logger.info("txt2img fast path: %s", accel.apply_fast_path(model, fast))
    rows = [measure(label, "ours", run, args, flops, reference=plain, iters=args.e2e_iters)]
    rows[0].note = f"images; latents: {float((last['latents'] - plain_latents).abs().max()):.2e}"
    theirs = diffusers_txt2img(args, model, latent) if have_diffusers(args) else None
    if theirs is not None:
        with torch.inference_mode():
            flops, _ = count_flops(theirs)
        rows.append(measure(label, "diffusers", theirs, args, flops, iters=args.e2e_iters))
    return rows


def bench_default_model(args: argparse.Namespace) -> list[Row]:
    """The default model's txt2img on the CPU: 3 images, 256x256, 50 DDIM steps, guidance 7.5, fp32."""
    from ldm.inference import pipeline
    from ldm.samplers import resolve

    folder = Path(args.default_model)
    if not (folder / "config.yaml").is_file() or not (folder / "model.safetensors").is_file():
        logger.warning("default model not found in %s: its line is skipped", folder)
        return []
    model = load_default_model(folder)
    latent, pixels = int(model.image_size), int(model.image_size) * model.first_stage_model.factor
    sampler = resolve("ddim")
    job = pipeline.plan_jobs(["a red circle on a blue background"], 3, 1, 42)[0]
    precision = pipeline.choose_precision("cpu", "autocast", False)

    def run() -> Any:
        gens = pipeline.generators(job.seeds)
        cond, uncond = pipeline.conditioning(model, job, "", 7.5, set())
        x_T = pipeline.draw(gens, (int(model.channels), latent, latent), "cpu")
        latents = pipeline.sample_txt2img(model, sampler, x_T, cond, uncond, 50, 7.5, gens)
        return pipeline.to_numpy(pipeline.decode(model, latents, precision))
    cpu = argparse.Namespace(**{**vars(args), "device": "cpu", "warmup": 1})
    row = measure(f"default model txt2img 3x{pixels}x{pixels} 50 steps", "ours", run, cpu,
                  iters=args.e2e_iters)
    row.note = f"{torch.get_num_threads()} threads, {row.ms / 3e3:.2f} s per image"
    return [row]


# ------------------------------------------------------------------------------------------- VAE peak memory --

def vae_peak(args: argparse.Namespace) -> dict[str, float]:
    """(child process) Peak memory of one decode of the real SD VAE: RSS growth on the CPU, allocator on CUDA."""
    latent, tile = args.vae_peak
    params = OmegaConf.load(CONFIGS / "v1-inference.yaml").model.params
    vae = instantiate_from_config(params.first_stage_config).to(args.device, args.dtype).eval()
    z = torch.randn(1, 4, latent, latent).to(args.device, args.dtype)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    with torch.inference_mode():
        image = vae.decode(z, tile_size=tile or None)
    sync(device)
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"latent": latent, "tile": tile, "pixels": image.shape[-1], "peak_mib": (peak - base) / 2 ** 20,
            "seconds": seconds}


def bench_vae_memory(args: argparse.Namespace) -> list[Row]:
    """Plain vs tiled decodes of a ``--vae-memory`` latent side, each in a fresh process (peak RSS is per process)."""
    latent, tile = args.vae_memory
    rows = []
    for t in (0, tile):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--device", args.device, "--dtype", args.dtype_name,
               "--threads", str(torch.get_num_threads()), "--_vae-peak", str(latent), str(t)]
        result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        label = f"VAE decode {result['pixels']}x{result['pixels']} peak"
        impl = f"ours tiled {t}" if t else "ours plain"
        rows.append(Row(label, impl, ms=result["seconds"] * 1e3, peak_mib=result["peak_mib"],
                        note="peak = growth of max RSS" if args.device == "cpu" else "peak = max allocated - base"))
    return rows


# ------------------------------------------------------------------------------------------------ reporting --

def fmt(value: Optional[float], spec: str) -> str:
    """``value`` formatted, or a dash."""
    return "—" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table; ratio = our time / diffusers' time for the same component."""
    theirs = {r.component: r.ms for r in rows if r.impl == "diffusers"}
    lines = ["| component | impl | ms (median) | p10–p90 | TFLOP/s | GFLOP | peak MiB | first call s | ratio | "
             "max abs diff vs plain | note |", "|" + "---|" * 11]
    for r in rows:
        tflops = r.flops / (r.ms * 1e-3) / 1e12 if r.flops and r.ms else None
        ratio = r.ms / theirs[r.component] if r.impl == "ours" and theirs.get(r.component) else None
        spread = f"{r.p10:.1f}–{r.p90:.1f}" if r.p10 is not None else "—"
        lines.append(f"| {r.component} | {r.impl} | {fmt(r.ms, '.1f')} | {spread} | {fmt(tflops, '.3g')} | "
                     f"{fmt(r.flops and r.flops / 1e9, '.0f')} | {fmt(r.peak_mib, '.0f')} | {fmt(r.first_s, '.2f')} | "
                     f"{fmt(ratio, '.2f')} | {fmt(r.diff, '.2e')} | {r.note} |")
    return "\n".join(lines)


def environment(args: argparse.Namespace) -> str:
    """One line: device, torch, diffusers, dtype, threads, options."""
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    diffusers = "absent"
    if have_diffusers(args):
        import diffusers as d
        diffusers = d.__version__
    options = {k: getattr(args, k) for k in ("channels_last", "compile", "cuda_graphs", "attention", "width_div",
                                             "vae_div", "latent_div")}
    return (f"{time.strftime('%Y-%m-%d')} · {device} · torch {torch.__version__} · diffusers {diffusers} · "
            f"{args.dtype_name} · {torch.get_num_threads()} threads · {options}")


# --------------------------------------------------------------------------------------------------- command --

COMPONENTS = ("unet1", "unet2", "vae", "txt2img", "default")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def default_threads() -> int:
    """The usable cores that other work leaves idle (``accel.sensible_threads``; all usable cores in old trees)."""
    try:
        from ldm.inference.accel import sensible_threads
    except ImportError:
        return len(os.sched_getaffinity(0))
    return sensible_threads()


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """Flags; sizes, dtype and repeat counts default by device (real sizes fp16 on CUDA, reduced fp32 on CPU)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", dest="dtype_name", choices=DTYPES, default=None, help="default fp16 on CUDA, else fp32")
    p.add_argument("--only", default=",".join(COMPONENTS), help=f"comma-separated subset of {','.join(COMPONENTS)}")
    p.add_argument("--warmup", type=int, default=None, help="calls before timing (default 10 CUDA, 1 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed calls per component (default 30 CUDA, 3 CPU)")
    p.add_argument("--e2e-iters", type=int, default=None, help="timed whole txt2img runs (default 10 CUDA, 1 CPU)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps of the txt2img line")
    p.add_argument("--sampler", default="DDIM", help='sampler of the txt2img line, e.g. "DPM++ 2M Karras" (diffusers '
                   "runs the matching scheduler for DDIM, DPM++ 2M Karras, Euler, Euler a, UniPC)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale of the txt2img line")
    p.add_argument("--full-size", action="store_true", help="real sizes on the CPU too (very slow)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the usable cores not busy with other work)")
    p.add_argument("--no-diffusers", action="store_true", help="do not compare with diffusers even if installed")
    p.add_argument("--channels-last", action="store_true", help="channels_last weights/activations (both contenders)")
    p.add_argument("--compile", default="off", choices=("off", "default", "max-autotune-no-cudagraphs",
                                                        "reduce-overhead", "max-autotune"),
                   help="torch.compile the UNet / VAE decoder (both contenders); first-call time shows its cost")
    p.add_argument("--cuda-graphs", action="store_true", help="replay UNet/VAE components from a CUDA graph")
    p.add_argument("--attention", default=None, choices=("sdpa", "math", "math-fp32", "xformers"),
                   help="our attention backend (default: each config's own; diffusers uses SDPA)")
    p.add_argument("--default-model", default=str(DEFAULT_MODEL), help="folder of the default model's files")
    p.add_argument("--vae-memory", type=int, nargs=2, metavar=("LATENT", "TILE"), default=None,
                   help="only measure peak memory of plain vs tiled decodes of a LATENTxLATENT latent (real SD VAE)")
    p.add_argument("--_vae-peak", dest="vae_peak", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda asked for, but no CUDA GPU is available: use --device cpu")
    if (args.cuda_graphs or args.compile != "off") and not cuda:
        p.error("--cuda-graphs and --compile are for CUDA devices")
    if args.cuda_graphs and args.compile != "off":
        p.error("--cuda-graphs captures eager kernels; for compiled graphs use --compile reduce-overhead instead")
    args.dtype_name = args.dtype_name or ("fp16" if cuda else "fp32")
    args.dtype = DTYPES[args.dtype_name]
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    args.iters = args.iters if args.iters is not None else (30 if cuda else 3)
    args.e2e_iters = args.e2e_iters if args.e2e_iters is not None else (10 if cuda else 1)
    reduced = not cuda and not args.full_size
    args.width_div, args.vae_div, args.latent_div = (5, 4, 2) if reduced else (1, 1, 1)
    args.only = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = set(args.only) - set(COMPONENTS)
    if unknown:
        p.error(f"unknown components {sorted(unknown)}; choose from {','.join(COMPONENTS)}")
    from ldm.samplers import UnknownSampler, resolve

    try:
        resolve(args.sampler)
    except UnknownSampler as e:
        p.error(str(e))
    return args


def main(argv: Optional[list[str]] = None) -> int:
    """Run the selected components and print the table (Markdown) on stdout."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads or default_threads())
    if args.vae_peak is not None:
        print(json.dumps(vae_peak(args)))
        return 0
    if args.vae_memory is not None:
        rows = bench_vae_memory(args)
    else:
        jobs = {"unet1": lambda: bench_unet(args, "v1-inference", 64),
                "unet2": lambda: bench_unet(args, "v2-inference", 96),
                "vae": lambda: bench_vae(args), "txt2img": lambda: bench_txt2img(args),
                "default": lambda: bench_default_model(args)}
        rows = [row for name in args.only for row in jobs[name]()]
    print(environment(args))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measure the default model: prompt adherence over all 224 colour x shape x background prompts, CLIP score,
autoencoder reconstruction PSNR.

    python scripts/evaluate.py                       # the shipped model, 3 seeds, 50 DDIM steps, scale 7.5
    python scripts/evaluate.py --seeds 1 --steps 20  # quicker
    python scripts/evaluate.py --ckpt model.safetensors --config config.yaml --out eval.json

Generation goes through ldm.inference (the txt2img scripts' path). Each picture is read back by the strict reader
(ldm.default_model.classify: a palette colour or "ambiguous", a circle, square, triangle or star only if it is one,
else "other"), first checked on real pictures and on their autoencoder reconstructions (the decoder's ceiling).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ldm.data.synthetic_shapes import combinations, render_item  # noqa: E402
from ldm.default_model.evaluation import (Adherence, batched, clip_from_parts, clip_scores,  # noqa: E402
                                          evaluation_prompts, psnr, reconstruct)
from ldm.checkpoint import load_weights, read_checkpoint  # noqa: E402
from ldm.default_model.export import build  # noqa: E402
from ldm.inference import loading, pipeline  # noqa: E402
from ldm.samplers import resolve  # noqa: E402

logger = logging.getLogger("evaluate")
REAL_SEED = 999  # data seed of the real pictures (the training data uses seed 0)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", type=Path, help="weights (default: the shipped default model)")
    p.add_argument("--config", type=Path, help="inference config (default: the shipped one)")
    p.add_argument("--clip_visual", type=Path, help="CLIP image tower (default: clip_visual.safetensors beside "
                   "the default model)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt (default 3: 672 pictures)")
    p.add_argument("--steps", type=int, default=50, help="sampler steps (default 50)")
    p.add_argument("--sampler", default="DDIM", help='sampler by name, e.g. "DPM++ 2M Karras" (default DDIM)')
    p.add_argument("--schedule", default=None, help="normal, karras or exponential (default: the sampler's own)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--batch", type=int, default=32, help="pictures per sampling batch (default 32)")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N prompt/seed pairs (quick checks)")
    p.add_argument("--every", type=int, default=1, help="evaluate only every Nth prompt/seed pair (a subset that "
                   "must still cover every colour, shape and background; 3: 75 of the 224 prompts of a seed)")
    p.add_argument("--real", type=int, default=224, help="real pictures for the PSNR and reference scores")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument("--grid", type=Path, help="save a grid of the first 64 generated pictures here")
    p.add_argument("--save_latents", type=Path, help="also save the sampled latents here (.safetensors)")
    p.add_argument("--from_latents", type=Path, help="decode these saved latents (of the same options) instead of "
                   "sampling: measures a new decoder with an unchanged diffusion model and text encoder")
    args = p.parse_args(argv)
    try:
        resolve(args.sampler, args.schedule)
    except ValueError as e:
        p.error(str(e))
    picked = selected_jobs(max(1, args.seeds), args.every)
    for index, (what, values) in enumerate(zip(("colours", "shapes", "backgrounds"), zip(*combinations()))):
        missing = sorted(set(values) - {combo[index] for _, combo, _ in picked})
        if missing:
            p.error(f"--every {args.every} with --seeds {args.seeds} leaves out the {what} {', '.join(missing)}: "
                    "pick a step with no common factor with 7 or 2 (3, 5, 9, ...)")
    for name in ("out", "grid", "save_latents"):
        path = getattr(args, name)
        if path is not None and path.exists():  # found before the minutes of generation, not after
            p.error(f"--{name} {path} already exists: choose a new path or remove the file first")
    return args


def selected_jobs(seeds: int, every: int) -> list[tuple[str, tuple[str, str, str], int]]:
    """The (prompt, combination, seed) jobs of ``--seeds`` and ``--every`` (before ``--limit``)."""
    return evaluation_prompts(list(range(seeds)))[::max(1, every)]


def real_pictures(count: int) -> tuple[torch.Tensor, list[Any]]:
    """Held-out real pictures [N, 3, 256, 256] in [-1, 1] and their scenes."""
    items = [render_item(REAL_SEED, i) for i in range(count)]
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im, _ in items])).permute(0, 3, 1, 2)
    return x / 127.5 - 1.0, [scene for _, scene in items]


@torch.no_grad()
def sample(model: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, scale: float,
           sampler: str = "DDIM", schedule: str | None = None) -> torch.Tensor:
    """Latents [B, C, h, w] through the inference pipeline's sampling."""
    device = next(model.parameters()).device
    cond = model.get_learned_conditioning(list(prompts))
    uncond = model.get_learned_conditioning([""] * len(prompts)) if scale != 1.0 else None
    gens = pipeline.generators(seeds)
    shape = (model.channels, model.image_size, model.image_size)
    x_T = pipeline.draw(gens, shape, device)
    return pipeline.sample_txt2img(model, resolve(sampler, schedule), x_T, cond, uncond, steps, scale, gens)


@torch.no_grad()
def decode(model: Any, latents: torch.Tensor) -> torch.Tensor:
    """Pictures [B, 3, H, W] in [0, 1] through the inference pipeline's decoding."""
    device = next(model.parameters()).device
    return pipeline.decode(model, latents.to(device), pipeline.choose_precision(str(device), "full", False))


def generate(model: Any, prompts: Sequence[str], seeds: Sequence[int], steps: int, scale: float,
             sampler: str = "DDIM", schedule: str | None = None) -> torch.Tensor:
    """Pictures [B, 3, H, W] in [0, 1] through the inference pipeline's sampling and decoding."""
    return decode(model, sample(model, prompts, seeds, steps, scale, sampler, schedule))


def load(args: argparse.Namespace) -> tuple[Any, Any, Path]:
    """(model, config, folder of the model files)."""
    source = loading.resolve_source(args.ckpt, args.config)
    config = loading.read_config(source.config_path)
    model = build(config)  # from plain containers (open_clip wants plain dicts for nested arch_config entries)
    state_dict = source.state_dict if source.state_dict is not None else read_checkpoint(source.ckpt_path)[0]
    load_weights(model, state_dict, use_ema=None, source=str(source.ckpt_path))
    return model.to(args.device).eval().requires_grad_(False), config, source.config_path.parent


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, 3, H, W] in [0, 1] -> uint8 [B, H, W, 3]."""
    return (pipeline.to_numpy(images) * 255.0 + 0.5).clip(0, 255).astype(np.uint8)


def check_real(model: Any, real: torch.Tensor, scenes: Sequence[Any]) -> dict[str, Any]:
    """Autoencoder PSNR on real pictures [N, 3, H, W] in [-1, 1], and the reader on them and on their
    reconstructions (the most a diffusion model with this decoder can reach)."""
    recon = reconstruct(model.first_stage_model, real)
    results: dict[str, Any] = {"autoencoder_psnr_db": float(psnr((recon + 1) / 2, (real + 1) / 2).mean())}
    for key, pictures in (("classifier_on_real", real), ("classifier_on_reconstructions", recon)):
        check = Adherence()
        for picture, scene in zip(to_uint8((pictures + 1) / 2), scenes):
            check.add(picture, scene.colour, scene.shape, scene.background)
        results[key] = check.rates()
        results[key + "_misses"] = dict(check.misses.most_common())
    logger.info("PSNR %.2f dB; reader on real pictures: %s; on their autoencoder reconstructions: %s",
                results["autoencoder_psnr_db"], results["classifier_on_real"],
                results["classifier_on_reconstructions"])
    return results


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Run every measurement; returns the results."""
    model, config, folder = load(args)
    results: dict[str, Any] = {"steps": args.steps, "scale": args.scale, "seeds": args.seeds, "every": args.every,
                               "limit": args.limit,
                               "sampler": resolve(args.sampler, args.schedule).combined_label}
    real, scenes = real_pictures(args.real)
    results.update(check_real(model, real, scenes))
    jobs = selected_jobs(args.seeds, args.every)
    if args.limit > 0:
        jobs = jobs[:args.limit]
    adherence, pictures, start = Adherence(), [], time.time()
    saved, sampled = (saved_latents(args, len(jobs)) if args.from_latents else None), []
    for n, part in enumerate(batched(jobs, args.batch)):
        if saved is not None:
            latents = saved[n * args.batch:n * args.batch + len(part)]
        else:
            latents = sample(model, [j[0] for j in part], [j[2] for j in part], args.steps, args.scale,
                             args.sampler, args.schedule)
        sampled.append(latents.float().cpu())
        images = decode(model, latents)
        for picture, (_, combo, seed) in zip(to_uint8(images), part):
            adherence.add(picture, *combo, seed=seed)
        pictures.append((images * 2 - 1).cpu())
        logger.info("%d/%d pictures, all-three so far %.3f (%.0f s)", adherence.total, len(jobs),
                    adherence.rates()["all"], time.time() - start)
    results["generation_seconds"] = time.time() - start
    if args.save_latents:
        save_file({"latents": torch.cat(sampled).contiguous()}, str(args.save_latents), metadata=latent_stamp(args))
    results["adherence"] = adherence.rates()
    results["adherence_breakdown"] = adherence.breakdown()
    results["adherence_misses"] = dict(adherence.misses.most_common())
    generated = torch.cat(pictures)
    visual = args.clip_visual or folder / "clip_visual.safetensors"
    if visual.exists():
        text_state = {k[len("model."):]: v for k, v in model.cond_stage_model.state_dict().items()}
        clip = clip_from_parts(config.model.params.cond_stage_config.params.arch_config, text_state,
                               load_file(str(visual))).to(args.device)
        gen_scores = clip_scores(clip, generated, [j[0] for j in jobs])
        real_scores = clip_scores(clip, real, [s.plain_caption for s in scenes])
        results["clip"] = {"generated": {k: v for k, v in gen_scores.items() if k != "per_image"},
                           "real": {k: v for k, v in real_scores.items() if k != "per_image"}}
    else:
        logger.warning("no CLIP image tower at %s: CLIP scores skipped", visual)
    if args.grid:
        save_grid(generated[:64], args.grid)
    return results


def latent_stamp(args: argparse.Namespace) -> dict[str, str]:
    """The options that decide the sampled latents (besides the weights)."""
    return {k: str(getattr(args, k)) for k in ("seeds", "steps", "sampler", "schedule", "scale", "limit", "every")}


def saved_latents(args: argparse.Namespace, count: int) -> torch.Tensor:
    """Latents saved by --save_latents with the same options; exits with a message when they do not fit."""
    from safetensors import safe_open

    with safe_open(str(args.from_latents), framework="pt") as f:
        stamp, latents = f.metadata() or {}, f.get_tensor("latents")
    if stamp != latent_stamp(args) or latents.shape[0] != count:
        raise SystemExit(f"--from_latents {args.from_latents}: saved with {stamp} ({latents.shape[0]} latents), "
                         f"not with these options {latent_stamp(args)} ({count} pictures)")
    return latents


def save_grid(pictures: torch.Tensor, path: Path, columns: int = 8) -> None:
    """Save pictures [N, 3, H, W] in [-1, 1] as one grid image."""
    arr = to_uint8((pictures + 1) / 2)
    rows = -(-len(arr) // columns)
    h, w = arr.shape[1:3]
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, a in enumerate(arr):
        grid[(i // columns) * h:(i // columns + 1) * h, (i % columns) * w:(i % columns + 1) * w] = a
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Evaluate, log a summary, optionally write JSON."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    results = evaluate(args)
    summary = {k: v for k, v in results.items() if k != "adherence_breakdown" and not k.endswith("_misses")}
    logger.info("results: %s", json.dumps(summary, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

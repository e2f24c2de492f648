"""Sample a pixel-space DDPM: ancestral sampling with the model's variance, or DDIM over a respaced subset.

    python scripts/sample_ddpm.py --config configs/ddpm/shapes32-cond.yaml --ckpt logs/<run>/checkpoints/last.ckpt
    python scripts/sample_ddpm.py ... --method ddim --steps 50 --class_label 0 1 2 3 --scale 3 --intermediates

Writes ``samples.png`` (a grid), one PNG per sample, and with ``--intermediates`` ``intermediates.png``: per sample a
row of x_t and a row of the predicted x0 over time. ``--steps`` takes a count ("250"), DDIM's stride rule
("ddim25") or sections ("10,10,5").
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ldm.models.diffusion.ancestral import sample_model  # noqa: E402
from ldm.models.diffusion.ddpm_tools import (class_conditioning, class_embedder, default_labels,  # noqa: E402
                                             intermediates_strip, load_ddpm, to_uint8)

logger = logging.getLogger("sample_ddpm")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="the model's training config (yaml)")
    p.add_argument("--ckpt", required=True, help="checkpoint: a training .ckpt or exported .safetensors")
    p.add_argument("--outdir", default="outputs/ddpm-samples", help="output folder (default: %(default)s)")
    p.add_argument("--n_samples", type=int, default=8, help="number of samples (default: %(default)s)")
    p.add_argument("--method", choices=("ancestral", "ddim"), default="ancestral", help="sampler (default: ancestral)")
    p.add_argument("--steps", default=None, help="respaced steps: N, ddimN or a,b,c (default: all for ancestral, "
                                                  "50 for DDIM)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    p.add_argument("--class_label", type=int, nargs="*", default=None, help="class labels, cycled over the samples")
    p.add_argument("--scale", type=float, default=1.0, help="classifier-free guidance scale (default: 1, none)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")
    p.add_argument("--intermediates", action="store_true", help="also save the strip of x_t / predicted x0")
    p.add_argument("--frames", type=int, default=10, help="about this many frames in the strip (default: 10)")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights, not the EMA ones")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.n_samples < 1:
        p.error("--n_samples must be >= 1")
    return args


def save_images(images: torch.Tensor, outdir: Path, nrow: int) -> list[Path]:
    """Write ``samples.png`` (grid) and ``sample_NNNN.png`` for images [B, C, H, W] in [-1, 1]."""
    from PIL import Image
    from torchvision.utils import make_grid

    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, arr in enumerate(to_uint8(images)):
        path = outdir / f"sample_{i:04d}.png"
        Image.fromarray(arr.squeeze(-1).numpy() if arr.shape[-1] == 1 else arr.numpy()).save(path)
        paths.append(path)
    grid = make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=1.0)
    Image.fromarray(to_uint8(grid[None])[0].squeeze(-1).numpy()).save(outdir / "samples.png")
    return [outdir / "samples.png", *paths]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, _ = load_ddpm(args.config, args.ckpt, use_ema=not args.no_ema, device=device)
    if getattr(model, "first_stage_model", None) is not None:
        raise SystemExit("this command samples pixel-space DDPMs; use scripts/txt2img.py for latent models")
    labels = None
    if class_embedder(model) is not None:
        given = args.class_label or default_labels(model, args.n_samples)
        labels = [given[i % len(given)] for i in range(args.n_samples)]
    elif args.class_label:
        raise SystemExit("--class_label given, but the model is not class-conditional")
    cond, uncond = class_conditioning(model, labels or [], args.scale) if labels else (None, None)
    generator = torch.Generator(device).manual_seed(args.seed)
    shape = (args.n_samples, model.channels, model.image_size, model.image_size)
    x_T = torch.randn(shape, generator=generator, device=device)
    samples, inter = sample_model(model, x_T, cond, method=args.method, steps=args.steps, eta=args.eta,
                                  uncond=uncond, guidance_scale=args.scale, generator=generator,
                                  progress=not args.no_progress, frames=args.frames)
    outdir = Path(args.outdir)
    paths = save_images(samples, outdir, nrow=min(8, args.n_samples))
    if labels is not None:
        (outdir / "labels.txt").write_text("\n".join(str(v) for v in labels) + "\n")
    if args.intermediates:
        from PIL import Image
        strip = intermediates_strip(inter)
        Image.fromarray(to_uint8(strip[None])[0].numpy()).save(outdir / "intermediates.png")
        paths.append(outdir / "intermediates.png")
    logger.info("wrote %d files to %s", len(paths), outdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())

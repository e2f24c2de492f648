"""Retrain the embedded default model (models/ldm/sd-shapes) from nothing, with the project's own code.

    python scripts/train_default_model.py                       # CPU: about 9 h on 2 cores
    python scripts/train_default_model.py --device cuda --threads 0
    python scripts/train_default_model.py --polish models/ldm/sd-shapes --out /tmp/polished   # fine-tuning only
    python scripts/train_default_model.py --tune_decoder models/ldm/sd-shapes --out /tmp/tuned  # decoder only

Stages: synthetic data -> small CLIP (contrastive) and KL autoencoder (scripts/train.py), side by side ->
latent cache -> cross-attention UNet with CFG dropout and EMA (scripts/train.py), then min-SNR fine-tuning rounds
from its EMA weights -> export of config.yaml and EMA-only model.safetensors -> decoder-only
fine-tuning -> shape-weighted min-SNR fine-tuning rounds on fresh pictures (--polish's stage, once per round of
POLISH_ROUNDS in ldm/default_model/recipe.py). Outputs of finished stages in --workdir are reused when the command is
run again.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ldm.default_model.decoder_tune import DecoderTuning, tune_exported_decoder  # noqa: E402
from ldm.default_model.recipe import POLISH_ROUNDS, Polish, PolishRound, Recipe, polish_model, run  # noqa: E402

logger = logging.getLogger("train_default_model")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults: the recipe of the shipped model)."""
    d = Recipe(workdir=Path("."), out_dir=Path("."))
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="logs/default-model", help="work folder (default logs/default-model)")
    p.add_argument("--out", default=str(ROOT / "models" / "ldm" / "sd-shapes"),
                   help="where the model is exported (default models/ldm/sd-shapes)")
    p.add_argument("--images", type=int, default=d.images, help=f"pictures for the diffusion model ({d.images})")
    p.add_argument("--clip_steps", type=int, default=d.clip_steps)
    p.add_argument("--ae_steps", type=int, default=d.ae_steps, help="autoencoder steps on 64x64 crops")
    p.add_argument("--ae_full_steps", type=int, default=d.ae_full_steps,
                   help="autoencoder steps on whole 256x256 pictures")
    p.add_argument("--unet_steps", type=int, default=d.unet_steps)
    p.add_argument("--finetune_steps", type=int, nargs="*", default=list(d.finetune_steps),
                   help="steps of each min-SNR fine-tuning round after the first diffusion stage (default "
                        f"{' '.join(map(str, d.finetune_steps))}; none given: no rounds)")
    p.add_argument("--unet_procs", type=int, default=d.unet_procs,
                   help=f"data-parallel processes for the UNet (torchrun; default {d.unet_procs}; 1 on one GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="torch threads per training process (default 1: CLIP and autoencoder train side by side; "
                        "0 leaves torch's default)")
    p.add_argument("--precision", default=d.precision, choices=["32", "bf16"],
                   help="precision of the diffusion model's training (default 32; bf16: autocast, faster on CPUs "
                        "with bfloat16 instructions and on GPUs)")
    p.add_argument("--sequential", action="store_true", help="train CLIP and the autoencoder one after the other")
    p.add_argument("--seed", type=int, default=d.seed)
    q = Polish(model_dir=Path("."))
    p.add_argument("--polish", type=Path, metavar="MODEL_DIR",
                   help="instead of training from nothing, fine-tune this exported model (min-SNR, ldm-finetune.yaml) "
                        "on plain + emphasised pictures encoded by its own autoencoder, and export to --out")
    p.add_argument("--polish_steps", type=int, default=None,
                   help=f"steps of that fine-tuning ({q.steps}); in a run from nothing, the steps of each of its "
                        "closing polish rounds (default: each round's own; 0 skips them)")
    p.add_argument("--polish_rounds", type=int, default=len(POLISH_ROUNDS),
                   help="how many of the recipe's polish rounds end a run from nothing, in order (default all "
                        f"{len(POLISH_ROUNDS)}: " + "; ".join(f"{r.steps} steps, {r.emphasis}, seed {r.emphasis_seed}"
                                                              for r in POLISH_ROUNDS) + ")")
    p.add_argument("--plain_images", type=int, default=q.plain_images,
                   help=f"plain training pictures in it ({q.plain_images})")
    p.add_argument("--emphasis_images", type=int, default=q.emphasis_images,
                   help=f"emphasised pictures in it ({q.emphasis_images})")
    p.add_argument("--emphasis", default=q.emphasis, help=f"their shape/colour weights ({q.emphasis})")
    p.add_argument("--emphasis_seed", type=int, default=q.emphasis_seed,
                   help=f"data seed of the emphasised pictures ({q.emphasis_seed}; another seed for a further round "
                        "draws new positions, sizes and combinations)")
    p.add_argument("--polish_lr", type=float, default=None, help="base learning rate (default: the config's)")
    t = DecoderTuning()
    p.add_argument("--tune_decoder", type=Path, metavar="MODEL_DIR",
                   help="instead, fine-tune only the decoder of this exported model (encoder, UNet, text encoder "
                        "unchanged; L1 on whole pictures) and export to --out")
    p.add_argument("--decoder_steps", type=int, default=t.steps,
                   help=f"steps of that, and of the decoder-only stage that ends a run from nothing ({t.steps}; 0 "
                        "skips that stage)")
    p.add_argument("--decoder_batch", type=int, default=t.batch_size, help=f"its batch size ({t.batch_size})")
    p.add_argument("--decoder_lr", type=float, default=t.learning_rate, help=f"its learning rate ({t.learning_rate})")
    p.add_argument("--decoder_crop", type=int, default=t.crop, help=f"its picture crops ({t.crop}; 256: whole)")
    return p.parse_args(argv)


def _polish_rounds(args: argparse.Namespace) -> tuple[PolishRound, ...]:
    """The polish rounds a run from nothing ends with (--polish_rounds of them, with --polish_steps when given)."""
    if not 0 <= args.polish_rounds <= len(POLISH_ROUNDS):
        raise SystemExit(f"--polish_rounds must be 0 to {len(POLISH_ROUNDS)}, got {args.polish_rounds}")
    rounds = POLISH_ROUNDS[:args.polish_rounds]
    if args.polish_steps is None:
        return rounds
    if args.polish_steps < 0:
        raise SystemExit(f"--polish_steps must be 0 or more, got {args.polish_steps}")
    return () if args.polish_steps == 0 else tuple(replace(r, steps=args.polish_steps) for r in rounds)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every stage and print the time each took."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = Recipe(workdir=Path(args.workdir).resolve(), out_dir=Path(args.out).resolve(), images=args.images,
                    clip_steps=args.clip_steps, ae_steps=args.ae_steps, ae_full_steps=args.ae_full_steps,
                    unet_steps=args.unet_steps, finetune_steps=tuple(args.finetune_steps),
                    decoder_steps=args.decoder_steps, polish_rounds=_polish_rounds(args), unet_procs=args.unet_procs,
                    device=args.device, threads=args.threads, precision=args.precision, parallel=not args.sequential,
                    seed=args.seed)
    for start in (args.polish, args.tune_decoder):
        if start is not None and Path(start).resolve() == recipe.out_dir:
            raise SystemExit("choose an --out other than the model being fine-tuned (measure it first)")
    if args.tune_decoder is not None:
        if args.threads > 0:
            import torch

            torch.set_num_threads(args.threads)
        cfg = DecoderTuning(steps=args.decoder_steps, batch_size=args.decoder_batch, learning_rate=args.decoder_lr,
                            crop=args.decoder_crop)
        logger.info("decoder written to %s", tune_exported_decoder(args.tune_decoder, recipe.out_dir, cfg, args.device))
        return 0
    if args.polish is not None:
        steps = Polish.steps if args.polish_steps is None else args.polish_steps
        timings = polish_model(recipe, Polish(
            model_dir=Path(args.polish).resolve(), steps=steps, plain_images=args.plain_images,
            emphasis_images=args.emphasis_images, emphasis=args.emphasis, emphasis_seed=args.emphasis_seed,
            learning_rate=args.polish_lr))
    else:
        timings = run(recipe)
    logger.info("default model written to %s; seconds per stage: %s", recipe.out_dir, json.dumps(timings))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pre-train the default model's small CLIP contrastively on freshly rendered shapes (open_clip CLIP + ClipLoss).

    python scripts/train_clip.py --out work/clip.safetensors --steps 800

Writes the full CLIP state_dict (open_clip names) as .safetensors and its config beside it (.json).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ldm.default_model.clip_pretrain import CLIP_CONFIG, ClipTraining, train_clip, zero_shot_accuracy  # noqa: E402

logger = logging.getLogger("train_clip")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output .safetensors path")
    p.add_argument("--steps", type=int, default=ClipTraining.steps)
    p.add_argument("--batch_size", type=int, default=ClipTraining.batch_size)
    p.add_argument("--lr", type=float, default=ClipTraining.lr)
    p.add_argument("--seed", type=int, default=ClipTraining.seed)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: leave torch's default)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Train, report zero-shot accuracy over the 224 prompts, save."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    settings = ClipTraining(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            warmup=min(ClipTraining.warmup, max(1, args.steps // 10)))
    start = time.time()
    model = train_clip(settings, device=args.device)
    accuracy = zero_shot_accuracy(model, device=args.device)
    logger.info("CLIP trained in %.0f s; zero-shot accuracy over the 224 prompts: %s", time.time() - start,
                {k: round(v, 4) for k, v in accuracy.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out))
    out.with_suffix(".json").write_text(json.dumps({"config": CLIP_CONFIG, "zero_shot": accuracy,
                                                    "steps": args.steps, "seconds": time.time() - start}, indent=1))
    logger.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

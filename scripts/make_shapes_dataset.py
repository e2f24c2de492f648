"""Write the synthetic shapes data set as an image folder: NNNNNNN.png + metadata.jsonl (captions, attributes).

    python scripts/make_shapes_dataset.py --out data/shapes --count 3000 --seed 0

The pictures are a pure function of (seed, index): the same command always writes the same files, and a
larger --count only adds files. ldm.data.folder.ImageCaptionFolder reads the folder.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ldm.data.synthetic_shapes import parse_emphasis, write_items, write_metadata  # noqa: E402

logger = logging.getLogger("make_shapes_dataset")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=int, default=3000, help="number of pictures (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="picture side in pixels (default 256)")
    p.add_argument("--start", type=int, default=0, help="first index (default 0)")
    p.add_argument("--workers", type=int, default=1, help="processes (default 1)")
    p.add_argument("--emphasis", default="", help='weights of shapes / foreground colours, e.g. "triangle=3,red=2" '
                   "(default none: every combination equally often, in blocks of 224)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Render and write the pictures, then metadata.jsonl."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.count < 1 or args.size < 8:
        raise SystemExit("--count must be >= 1 and --size >= 8")
    try:
        emphasis = parse_emphasis(args.emphasis)
    except ValueError as e:
        raise SystemExit(f"--emphasis: {e}") from None
    start, stop = args.start, args.start + args.count
    chunk = max(1, -(-args.count // max(1, args.workers)))
    ranges = [range(i, min(i + chunk, stop)) for i in range(start, stop, chunk)]
    began = time.time()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            parts = list(pool.map(write_items, [args.out] * len(ranges), [args.seed] * len(ranges), ranges,
                                  [args.size] * len(ranges), [emphasis] * len(ranges)))
    else:
        parts = [write_items(args.out, args.seed, r, args.size, emphasis) for r in ranges]
    records = [r for part in parts for r in part]
    path = write_metadata(args.out, records)
    logger.info("wrote %d pictures and %s in %.1f s", len(records), path, time.time() - began)
    return 0


if __name__ == "__main__":
    sys.exit(main())

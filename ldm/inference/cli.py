"""Entry point shared by scripts/txt2img.py and scripts/img2img.py: flags, logging, progress bars, exit status."""
from __future__ import annotations

import logging
import sys
from typing import Any, ContextManager, Optional, Sequence

from ldm.checkpoint import CheckpointError
from ldm.inference.args import parse_options
from ldm.inference.errors import EXIT_USAGE, UsageError
from ldm.inference.run import run


def tqdm_progress(total: int, desc: str) -> ContextManager[Any]:
    """A tqdm bar (on stderr); the per-batch sampling bars disappear when done."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=desc != "sampling", dynamic_ncols=True)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    logging.getLogger("ldm.inference").setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]], mode: str) -> int:
    """Run ``scripts/<mode>.py`` with ``argv``; 0 on success, 2 (nothing written) for any user-caused error."""
    _setup_logging()
    try:
        opts = parse_options(argv, mode)
        result = run(opts, progress=tqdm_progress)
    except (UsageError, CheckpointError) as e:
        print(f"{mode}.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(result.summary(opts.outdir))
    return 0

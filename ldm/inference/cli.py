"""Entry point shared by scripts/txt2img.py and scripts/img2img.py: flags, logging, progress bars, exit status.

Every failure ends in one readable line on stderr, never a traceback: 2 for what the user can fix in the command
(flags, files, permissions, sizes), 1 when the run fails on the way (full disk, out of memory, NaN results), 130
for Ctrl-C. Files already written stay complete; the line says how many there are. ``LDM_DEBUG=1`` logs the
traceback of unexpected errors.
"""
from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, ContextManager, Optional, Sequence

from ldm.checkpoint import CheckpointError
from ldm.inference.args import parse_options
from ldm.inference.errors import EXIT_USAGE, UsageError
from ldm.inference.limits import NonFiniteResult
from ldm.inference.run import RunResult, run

logger = logging.getLogger("ldm.inference.cli")

EXIT_FAILED = 1  # the run failed on the way (disk full, out of memory, NaN results, an unexpected error)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def tqdm_progress(total: int, desc: str) -> ContextManager[Any]:
    """A tqdm bar (on stderr); the per-batch sampling bars disappear when done."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, leave=desc != "sampling", dynamic_ncols=True)


def _setup_logging() -> None:
    debug = os.environ.get("LDM_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format="%(levelname)s: %(message)s")
    for name in ("ldm.inference", "ldm.api"):  # the scripts' info lines, also from the API they use
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.INFO)


def _saved(result: RunResult, outdir: Optional[Path]) -> str:
    """'N images saved in OUT/samples' (or 'no images saved') for the last line of a failed run."""
    n = len(result.samples)
    if not n:
        return "no images saved"
    where = f" in {outdir / 'samples'}" if outdir is not None else ""
    return f"{n} image{'' if n == 1 else 's'} saved{where} (no grid)"


def _is_out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and ("out of memory" in text.lower() or "can't allocate memory" in text)


def _describe(e: BaseException, outdir: Optional[Path]) -> tuple[str, int]:
    """(message, exit status) of an error raised by a run."""
    if isinstance(e, (UsageError, CheckpointError)):
        return str(e), EXIT_USAGE
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", EXIT_INTERRUPTED
    if isinstance(e, NonFiniteResult):
        return str(e), EXIT_FAILED
    if isinstance(e, OSError):
        target = e.filename if e.filename is not None else outdir
        if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
            return f"no space left on the disk of '{target}': free some space or choose another --outdir", EXIT_FAILED
        if isinstance(e, PermissionError) or e.errno == errno.EROFS:
            return (f"cannot write '{target}': {e.strerror or e}; choose another --outdir or fix its permissions",
                    EXIT_USAGE)
        return f"cannot write or read '{target}': {e.strerror or e}", EXIT_FAILED
    if _is_out_of_memory(e):
        return ("out of memory: lower --n_samples or --W/--H, add --tiled_vae, or use another --device",
                EXIT_FAILED)
    logger.debug("unexpected error", exc_info=e)
    return (f"unexpected {type(e).__name__}: {e} (a bug: please report it; LDM_DEBUG=1 shows the traceback)",
            EXIT_FAILED)


def main(argv: Optional[Sequence[str]], mode: str) -> int:
    """Run ``scripts/<mode>.py`` with ``argv``; 0 on success, 2 for user-caused errors, 1 for failed runs, 130 for
    Ctrl-C; every failure is one line on stderr."""
    _setup_logging()
    result, outdir = RunResult(), None
    try:
        opts = parse_options(argv, mode)
        outdir = opts.outdir
        run(opts, progress=tqdm_progress, result=result)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - one line per failure, never a traceback
        message, status = _describe(e, outdir)
        input_error = isinstance(e, (UsageError, CheckpointError))  # found before anything was written
        saved = "" if input_error and not result.samples else f"; {_saved(result, outdir)}"
        kind = "stopped" if status == EXIT_INTERRUPTED else "error"
        print(f"{mode}.py: {kind}: {message}{saved}", file=sys.stderr)
        return status
    print(result.summary(opts.outdir))
    return 0

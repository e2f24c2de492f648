#!/usr/bin/env python
"""Generate images from a text prompt (flags of the original SD 1 and SD 2 scripts; see --help)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.inference.cli import main as _main  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: the command line) and run; returns the exit status."""
    return _main(argv, "txt2img")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Turn an input image into a new one guided by a text prompt (the original img2img flags; see --help)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.inference.cli import main as _main  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: the command line) and run; returns the exit status."""
    return _main(argv, "img2img")


if __name__ == "__main__":
    sys.exit(main())

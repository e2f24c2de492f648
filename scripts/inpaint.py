#!/usr/bin/env python
"""Repaint the masked part of an image, or paint a larger canvas around it, guided by a text prompt.

img2img's flags plus --mask (white = repaint), --mask_blur, --invert_mask, --outpaint L,R,T,B and
--inpaint_full_res; see --help.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.inference.cli import main as _main  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: the command line) and run; returns the exit status."""
    return _main(argv, "inpaint")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Serve a model over the AUTOMATIC1111 web UI's HTTP API (``/sdapi/v1/...``) with a browser page at ``/``.

Binds 127.0.0.1:7860 by default; ``--listen`` opens it to the network (with ``--api-auth USER:PASSWORD``, or
``--insecure``). See --help.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from ldm.server.cli import main as _main  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default: the command line) and serve; returns the exit status."""
    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())

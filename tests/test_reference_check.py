"""The whole reference suite of the original implementation, run through ../shared/reference/check.py."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_reference_check_passes(reference_dir):
    proc = subprocess.run([sys.executable, str(reference_dir / "check.py")], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " 0 failed, 0 skipped" in summary, summary

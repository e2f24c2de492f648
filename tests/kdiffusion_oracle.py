"""The k-diffusion package (test-only dependency) as an oracle: its ``sampling`` and ``external`` modules loaded
without the package's heavy top-level imports (wandb, kornia, ... are not needed for sampling)."""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from typing import Any

import pytest


def load_k_diffusion() -> tuple[Any, Any]:
    """(k_diffusion.sampling, k_diffusion.external); skips the test when the package is not installed."""
    loaded = sys.modules.get("k_diffusion")
    if loaded is None or not hasattr(loaded, "sampling"):
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion torchsde torchdiffeq)")
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
        for name in ("utils", "sampling", "external"):
            setattr(package, name, importlib.import_module(f"k_diffusion.{name}"))
    package = sys.modules["k_diffusion"]
    return package.sampling, package.external

"""Test fixtures: the network is blocked for every test; reference data lives in ../shared/reference."""
from __future__ import annotations

import functools
import importlib.util
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference"


class NetworkBlocked(RuntimeError):
    """Raised when code under test tries to open a network connection."""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Fail any attempt to reach the network (the project must never download)."""

    def guard(*args, **kwargs):
        raise NetworkBlocked("network access attempted during a test")

    monkeypatch.setattr(socket.socket, "connect", guard)
    monkeypatch.setattr(socket, "create_connection", guard)
    monkeypatch.setattr(socket, "getaddrinfo", guard)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def reference_dir() -> Path:
    """Folder with the original implementation's reference vectors; tests needing it skip when absent."""
    if not (REFERENCE / "cases.json").exists():
        pytest.skip("../shared/reference is not present")
    return REFERENCE


@functools.lru_cache(maxsize=None)
def reference_oracle(root: str):
    """The reference folder's check.py as a module (its Case builder, scripted noise, comparison), loaded once."""
    spec = importlib.util.spec_from_file_location("reference_check", Path(root) / "check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

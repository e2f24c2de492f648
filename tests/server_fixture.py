"""The server started in-process on a free 127.0.0.1 port, for the server tests (and the page test).

Use in a test module::

    from server_fixture import _no_network, server  # noqa: F401  (loopback allowed; module-scoped server)

``server`` is a :class:`RunningServer` (``url``, ``port``, ``service``) serving the shipped default model; its
images are saved under a temporary ``outdir``; previews are decoded at every step. The model is loaded once per
test process and shared by every server started here (one at a time generates).
"""
from __future__ import annotations

import functools
import ipaddress
import shutil
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator, Optional

import pytest
import torch

from ldm.api import Generator
from ldm.model_family import DEFAULT_MODEL_DIR
from ldm.server.service import ServerConfig, Service

HOST = "127.0.0.1"
_connect, _create_connection, _getaddrinfo = socket.socket.connect, socket.create_connection, socket.getaddrinfo


def _loopback(address: Any) -> bool:
    host = address[0] if isinstance(address, tuple) else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except (ValueError, TypeError):
        return False


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Overrides the suite's network block: loopback connections (the test server) pass, all others fail."""

    def connect(sock, address, *args, **kwargs):
        if sock.family == getattr(socket, "AF_UNIX", None) or _loopback(address):
            return _connect(sock, address, *args, **kwargs)
        raise RuntimeError(f"network access attempted during a test: {address}")

    def create_connection(address, *args, **kwargs):
        if _loopback(address):
            return _create_connection(address, *args, **kwargs)
        raise RuntimeError(f"network access attempted during a test: {address}")

    def getaddrinfo(host, *args, **kwargs):
        if _loopback(host if isinstance(host, str) else str(host)):
            return _getaddrinfo(host, *args, **kwargs)
        raise RuntimeError(f"network access attempted during a test: {host}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@functools.lru_cache(maxsize=1)
def shared_generator() -> Generator:
    """The shipped default model on the CPU, loaded once per test process."""
    return Generator.load(device="cpu", precision="full")


@dataclass
class RunningServer:
    """A server running on a thread: where to reach it and its service (queue, model, settings)."""

    port: int
    service: Service
    server: Any
    thread: threading.Thread
    torch_threads: int = 0  # torch's CPU threads before the server started (restored by stop)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    def stop(self) -> None:
        """Stop serving and the worker."""
        self.server.should_exit = True
        self.thread.join(10)
        self.service.close()
        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)


def start_server(cfg: ServerConfig, generator: Optional[Generator] = None) -> RunningServer:
    """Serve ``cfg`` with uvicorn on a free loopback port (a socket bound before the server starts); torch runs on
    one CPU thread meanwhile (tiny images gain nothing from two, and on a busy machine two wait on each other)."""
    import uvicorn

    from ldm.server.app import create_app

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    service = Service(cfg, generator or shared_generator())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((HOST, 0))
    server = uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        service.close()
        torch.set_num_threads(threads)
        raise RuntimeError("the test server did not start")
    return RunningServer(sock.getsockname()[1], service, server, thread, threads)


def make_config(tmp: Path, **changes: Any) -> ServerConfig:
    """Settings for a test server: output under ``tmp``, a second checkpoint to switch to, previews always."""
    models = tmp / "models"
    models.mkdir(parents=True, exist_ok=True)
    copy = models / "shapes-copy.safetensors"
    if not copy.exists():
        shutil.copyfile(DEFAULT_MODEL_DIR / "model.safetensors", copy)
        shutil.copyfile(DEFAULT_MODEL_DIR / "config.yaml", copy.with_suffix(".yaml"))
    cfg = ServerConfig(ckpt_dirs=(models,), outdir=tmp / "outputs", watermark=False, preview_interval=0.0,
                       device="cpu", precision="full")
    return replace(cfg, **changes)


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    """A server on the default model for the whole test module."""
    running = start_server(make_config(tmp_path_factory.mktemp("server")))
    yield running
    running.stop()

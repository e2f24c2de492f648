"""``scripts/serve.py``: flags, the refusal to open the server to the network without a password, uvicorn."""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Optional, Sequence

from ldm.inference.errors import EXIT_USAGE, UsageError, UsageParser
from ldm.server.schemas import Limits

logger = logging.getLogger("ldm.server")

DEFAULT_PORT = 7860  # the web UI's
LOCAL_HOST = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    """The flags of scripts/serve.py."""
    d = Limits()
    p = UsageParser(prog="serve.py", description="Serve a model over the AUTOMATIC1111 web UI's HTTP API, with a page.")
    net = p.add_argument_group("network")
    net.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    net.add_argument("--listen", action="store_true", help="listen on every interface (0.0.0.0), not only here")
    net.add_argument("--host", default=None, help="the address to bind (default 127.0.0.1; 0.0.0.0 with --listen)")
    net.add_argument("--api-auth", "--api_auth", dest="api_auth", default=None, metavar="USER:PASSWORD",
                     help="require HTTP basic auth with these credentials for every request")
    net.add_argument("--api-auth-file", "--api_auth_file", dest="api_auth_file", type=Path, default=None,
                     metavar="PATH", help="the same, read from the first line of a file (kept out of the process "
                                          "list and the shell history)")
    net.add_argument("--insecure", action="store_true",
                     help="allow listening on a non-local address without --api-auth (anyone reaching it can use it)")
    m = p.add_argument_group("model")
    m.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint or diffusers folder (default: the shipped model)")
    m.add_argument("--config", type=Path, default=None, help="its config (default: beside it, or inferred)")
    m.add_argument("--vae", type=Path, default=None, help="external autoencoder weights")
    m.add_argument("--lora", action="append", default=None, metavar="PATH[:WEIGHT]", help="merge a LoRA; repeatable")
    m.add_argument("--ckpt_dir", type=Path, action="append", default=None,
                   help="folder of more checkpoints that /sdapi/v1/options can switch to; repeatable")
    m.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    m.add_argument("--precision", choices=("full", "autocast"), default="autocast", help="as txt2img.py")
    o = p.add_argument_group("outputs and limits")
    o.add_argument("--outdir", type=Path, default=Path("outputs"),
                   help="save_images writes to OUTDIR/<txt2img|img2img|inpaint>-samples/samples (default outputs)")
    o.add_argument("--no_watermark", action="store_true",
                   help="answer and save without the invisible watermark")
    o.add_argument("--no_safety_check", action="store_true", help="switch the NSFW safety checker off")
    o.add_argument("--safety_checker", type=Path, default=None,
                   help="folder with the safety checker (default: models/safety_checker when there)")
    o.add_argument("--preview_every", type=float, default=1.0, metavar="SECONDS",
                   help="decode a live preview at most this often (default 1; negative: never)")
    o.add_argument("--max_pixels", type=int, default=d.max_pixels, help=f"width x height (default {d.max_pixels})")
    o.add_argument("--max_steps", type=int, default=d.max_steps, help=f"default {d.max_steps}")
    o.add_argument("--max_batch_size", type=int, default=d.max_batch_size, help=f"default {d.max_batch_size}")
    o.add_argument("--max_n_iter", type=int, default=d.max_n_iter, help=f"default {d.max_n_iter}")
    o.add_argument("--max_queue", type=int, default=d.max_queue,
                   help=f"jobs that may wait behind the running one; more are answered 503 (default {d.max_queue})")
    o.add_argument("--max_upload_mb", type=float, default=d.max_upload_bytes / 2 ** 20,
                   help=f"largest request body in MiB (default {d.max_upload_bytes / 2 ** 20:g})")
    return p


def is_local(host: str) -> bool:
    """True for loopback addresses and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(ns: argparse.Namespace) -> str:
    """The address to bind; UsageError for a non-local one without auth (and without --insecure), bad values."""
    from ldm.server.auth import parse_credentials

    host = ns.host or ("0.0.0.0" if ns.listen else LOCAL_HOST)
    if not 0 < ns.port < 65536:
        raise UsageError(f"--port must be between 1 and 65535, got {ns.port}")
    if ns.api_auth_file is not None:
        ns.api_auth = read_auth_file(ns.api_auth_file, ns.api_auth)
    if ns.api_auth is not None:
        try:
            parse_credentials(ns.api_auth)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if not is_local(host) and ns.api_auth is None and not ns.insecure:
        raise UsageError(f"refusing to listen on {host} without a password: add --api-auth USER:PASSWORD (or "
                         f"--insecure to let anyone on the network use it)")
    for flag in ("max_pixels", "max_steps", "max_batch_size", "max_n_iter", "max_upload_mb", "max_queue"):
        if getattr(ns, flag) <= 0:
            raise UsageError(f"--{flag} must be positive, got {getattr(ns, flag)}")
    return host


def read_auth_file(path: Path, given: Optional[str]) -> str:
    """The ``USER:PASSWORD`` on the first non-blank line of ``path``; UsageError when unreadable, empty or given
    twice. A file others may read gets a warning."""
    if given is not None:
        raise UsageError("--api-auth and --api-auth-file contradict each other: keep one")
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--api-auth-file: cannot read '{path}' ({e}); write USER:PASSWORD on its first line") \
            from None
    if not lines:
        raise UsageError(f"--api-auth-file '{path}' is empty; write USER:PASSWORD on its first line")
    if os.name == "posix" and path.stat().st_mode & 0o077:
        logger.warning("--api-auth-file '%s' can be read by other users: chmod 600 it", path)
    return lines[0]


def server_config(ns: argparse.Namespace) -> "ServerConfig":
    """The service settings of parsed flags."""
    from ldm.inference.args import check_safety_path
    from ldm.server.service import ServerConfig

    limits = Limits(ns.max_pixels, ns.max_steps, ns.max_batch_size, ns.max_n_iter, int(ns.max_upload_mb * 2 ** 20),
                    ns.max_queue)
    return ServerConfig(ckpt=ns.ckpt, config=ns.config, vae=ns.vae, loras=tuple(ns.lora or ()), device=ns.device,
                        precision=ns.precision, ckpt_dirs=tuple(ns.ckpt_dir or ()), outdir=ns.outdir,
                        watermark=not ns.no_watermark, safety_check=not ns.no_safety_check,
                        safety_checker=check_safety_path(ns), preview_interval=ns.preview_every, limits=limits,
                        auth=ns.api_auth)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse the flags, load the model, serve until Ctrl-C; 2 for bad flags or model files (one line)."""
    from ldm.checkpoint import CheckpointError

    debug = os.environ.get("LDM_DEBUG", "") not in ("", "0")
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="%(levelname)s: %(message)s")
    try:
        ns = build_parser().parse_args(argv)
        host = check_args(ns)
        try:
            import uvicorn

            from ldm.server.app import create_app
        except ImportError as e:
            raise UsageError(f"the server needs FastAPI and uvicorn ({e}): pip install -e '.[server]'") from None
        from ldm.server.service import Service

        cfg = server_config(ns)
        sock = bind(host, ns.port)  # before the model loads: a taken port fails at once
        try:
            service = Service(cfg)
        except BaseException:
            sock.close()
            raise
    except (UsageError, CheckpointError) as e:
        print(f"serve.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    shown = "localhost" if host == LOCAL_HOST else host
    logger.info("serving %s on http://%s:%d/ (API under /sdapi/v1)", service.current.title, shown, ns.port)
    try:
        uvicorn.Server(uvicorn.Config(create_app(service), log_level="warning")).run(sockets=[sock])
    finally:
        service.close()
        sock.close()
    return 0


def bind(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port; UsageError when the address is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({e.strerror or e}): another server may use the port; "
                         f"choose another --port") from None
    return sock

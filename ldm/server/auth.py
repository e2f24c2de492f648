"""Guards in front of every route: HTTP basic auth (``--api-auth user:pass``, compared in constant time) and the
upload limit. Both answer before a request body is read or any work is queued."""
from __future__ import annotations

import base64
import binascii
import json
import secrets
from typing import Any, Awaitable, Callable, Optional

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def parse_credentials(text: str) -> tuple[str, str]:
    """``user:pass`` -> (user, pass); ValueError when either part is empty."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError("--api-auth needs USER:PASSWORD, both non-empty")
    return user, password


def credentials_ok(header: Optional[bytes], user: str, password: str) -> bool:
    """True when an ``Authorization: Basic ...`` header holds exactly ``user`` and ``password``."""
    if not header or not header[:6].lower() == b"basic ":
        return False
    try:
        given = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    given_user, sep, given_password = given.partition(b":")
    user_ok = secrets.compare_digest(given_user, user.encode("utf-8"))
    password_ok = secrets.compare_digest(given_password, password.encode("utf-8"))
    return bool(sep) and user_ok and password_ok


async def _answer(send: Send, status: int, detail: str, headers: Optional[list] = None) -> None:
    body = json.dumps({"detail": detail}).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class BasicAuth:
    """ASGI middleware: every HTTP request needs the credentials, else 401 (and nothing runs)."""

    def __init__(self, app: ASGIApp, credentials: str):
        self.app = app
        self.user, self.password = parse_credentials(credentials)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the Authorization header, then pass the request on."""
        if scope["type"] == "http":
            header = dict(scope.get("headers") or []).get(b"authorization")
            if not credentials_ok(header, self.user, self.password):
                await _answer(send, 401, "wrong or missing credentials (HTTP basic auth)",
                              [(b"www-authenticate", b'Basic realm="ldm"')])
                return
        await self.app(scope, receive, send)


class _TooLarge(Exception):
    pass


class UploadLimit:
    """ASGI middleware: a request body larger than ``max_bytes`` is answered 413 before it is parsed."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse by Content-Length at once; count the bytes of bodies sent without one."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        message = (f"the request is larger than this server accepts ({self.max_bytes} bytes; "
                   f"scripts/serve.py --max_upload_mb raises it)")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _answer(send, 413, message)
            return
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return msg

        async def tracked(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await _answer(send, 413, message)

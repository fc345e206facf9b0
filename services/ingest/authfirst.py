"""Authenticate before any body byte is read (an ASGI middleware in front of the routers).

FastAPI parses a route's form or JSON body before it runs the route's dependencies, so with
the auth check only in a dependency an anonymous client could make ingest read hundreds of MB
before its 401. This middleware looks at the headers alone: a request to a
protected route without a valid bearer token is answered 401 at once, with
``Connection: close`` (the server then drops the connection instead of reading the rest), and
the application never sees it. The caller it verified goes into the ASGI scope, where
:class:`services.ingest.deps.Auth` takes it instead of verifying again.

Every path needs a bearer token except the few in :data:`PUBLIC_PATHS` and under
:data:`PUBLIC_PREFIXES`, which were public before: health and metrics, the workbench's static
files and its sign-in config, MONAI Label's ``/auth/`` and its sign-in form, the OpenAPI pages.
An explicit list, denying by default: a new public route must be added here, and a path no
route serves needs a token too (no route map for strangers). The routes keep their own check
(:func:`services.ingest.deps.signed_in`) as a second line. Public routes take bodies of at most
``PUBLIC_BODY_BYTES``, with a declared length; any body declared over the upload limit is
refused (413) before it is read, and one that arrives without a length (chunked) is counted as
it comes in and refused (413, connection closed) the moment it passes the limit, before a
route reads any more of it.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ctloop.auth import Principal
from services.ingest.deps import PRINCIPAL_KEY, IngestContext
from services.ingest.errors import DEPENDENCY_DOWN, ApiError, BodyTooLarge, unavailable

# What anyone may call without a token (GET, except MONAI Label's sign-in form).
PUBLIC_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/metrics",
        "/ui",
        "/v1/workbench/config",
        "/auth/",
        "/auth/token",
        "/openapi.json",
        "/docs",
        "/docs/oauth2-redirect",
        "/redoc",
    }
)
PUBLIC_PREFIXES = ("/ui/",)  # the workbench's page, scripts and styles
# A public route's body (MONAI Label's sign-in form) is a few hundred bytes.
PUBLIC_BODY_BYTES = 64 * 1024
# Multipart framing and form fields around an upload's file.
FORM_SLACK_BYTES = 1024 * 1024


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


class AuthenticateFirst:
    """The ASGI middleware (see the module docstring)."""

    def __init__(self, app: ASGIApp, ctx: IngestContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if is_public(scope["path"]):
                self._check_public_body(scope)
            else:
                scope[PRINCIPAL_KEY] = await self._authenticate(scope)
                limit = self.ctx.limits.max_bytes + FORM_SLACK_BYTES
                self._check_length(scope, limit)
                receive = BodyBudget(receive, limit)
        except ApiError as refused:
            await _refuse(refused, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except BodyTooLarge as refused:  # raised where the app's error handlers do not reach
            if started:
                raise
            await _refuse(refused.refusal, send)

    async def _authenticate(self, scope: Scope) -> Principal:
        authorization = _header(scope, b"authorization")
        try:
            return await run_in_threadpool(self.ctx.auth.authenticate, authorization)
        except DEPENDENCY_DOWN as exc:
            raise unavailable(exc) from exc
        except ApiError as refused:
            client = scope.get("client")
            address = client[0] if client else "unknown"
            where = f"{scope['method']} {scope['path']}"
            await run_in_threadpool(
                self.ctx.auth_audit.failed, address, where, authorization, refused.code
            )
            raise

    def _check_public_body(self, scope: Scope) -> None:
        if _header(scope, b"transfer-encoding"):
            raise ApiError("length_required", "send a Content-Length with the body", 411)
        self._check_length(scope, PUBLIC_BODY_BYTES)

    @staticmethod
    def _check_length(scope: Scope, limit: int) -> None:
        declared = _header(scope, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError("too_large", f"the request body exceeds {limit} bytes", 413)


class BodyBudget:
    """An ASGI ``receive`` that counts the body's bytes and raises :class:`BodyTooLarge` the
    moment they pass ``limit``, whatever the request declared (chunked bodies declare
    nothing)."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.seen = 0

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise BodyTooLarge(self.limit)
        return message


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return ""


async def _refuse(refused: ApiError, send: Send) -> None:
    """The API's error answer, and the connection closed after it: the unread body is not
    read (uvicorn closes a connection whose response says ``Connection: close``)."""
    body = json.dumps({"code": refused.code, "message": refused.message}).encode()
    headers: list[tuple[bytes, bytes]] = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
    ]
    headers += [(k.lower().encode(), v.encode()) for k, v in (refused.headers or {}).items()]
    start: dict[str, Any] = {"type": "http.response.start", "status": refused.status}
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})

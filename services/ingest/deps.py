"""What every router depends on: the service's context, who is calling, and the request body.

Routers declare these with ``Annotated`` types (``ctx: Context, who: Uploader``), as FastAPI's
own docs do; the context lives on ``app.state`` (one per app, so tests can run several apps).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated

from fastapi import Depends, Request, UploadFile

from ctloop.auth import ROLES, TOKEN_PREFIX, OidcVerifier, Principal, principal_for
from ctloop.outbox import OutboxRelay
from ctloop.settings import Settings
from ctloop.storage import ObjectStore
from services.ingest.auth_audit import AuthAudit
from services.ingest.backends import Backends
from services.ingest.background import Tasks
from services.ingest.errors import ApiError
from services.ingest.queue import WorkQueue
from services.ingest.validation import Limits
from services.ingest.viewer import SliceReads, VolumeCache

# Where :class:`services.ingest.authfirst.AuthenticateFirst` leaves the caller it verified
# from the headers, so the route's dependency does not verify the token a second time.
PRINCIPAL_KEY = "ctloop.principal"


class Auth:
    """Who a bearer token stands for: a ctloop API token, or an OIDC access token."""

    def __init__(self, database_url: str, oidc: OidcVerifier | None = None) -> None:
        self.db = database_url
        self.oidc = oidc

    def authenticate(self, authorization: str) -> Principal:
        """The caller an ``Authorization`` header value names; 401 (``unauthenticated``: no
        bearer token, ``bad_token``: unknown, revoked or invalid) otherwise."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(
                "unauthenticated",
                "send 'Authorization: Bearer <token>'",
                401,
                {"WWW-Authenticate": "Bearer"},
            )
        who = self.verify(token)
        if who is None:
            raise ApiError(
                "bad_token",
                "the token is unknown or revoked",
                401,
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return who

    def principal(self, request: Request) -> Principal:
        """The caller of ``request``: the one the middleware verified, else from its headers."""
        found = request.scope.get(PRINCIPAL_KEY)
        if isinstance(found, Principal):
            return found
        return self.authenticate(request.headers.get("authorization", ""))

    def verify(self, token: str) -> Principal | None:
        """The principal a bearer token stands for (None: unknown, revoked or invalid)."""
        token = token.strip()
        if token.startswith(TOKEN_PREFIX):
            return principal_for(self.db, token)
        return self.oidc.principal(token) if self.oidc is not None else None


class IngestContext:
    """The ingest service's state: settings, stores, auth, the work queue, the gRPC backends,
    the outbox relay to wake, and the worker pool that decodes uploads."""

    def __init__(self, settings: Settings, relay: OutboxRelay | None = None) -> None:
        svc = settings.services
        self.settings = settings
        self.db = settings.database_url
        self.store = ObjectStore(settings)
        self.bucket = settings.s3.bucket
        self.relay = relay
        self.pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="ingest-work")
        self.limits = Limits(
            max_bytes=svc.max_upload_mb * 1024 * 1024, max_voxels=svc.max_volume_voxels
        )
        oidc = OidcVerifier(settings.auth, self.db) if settings.auth.oidc_issuer else None
        self.auth = Auth(self.db, oidc)
        self.auth_audit = AuthAudit(self.db, settings.auth.refusals_audited_per_minute)
        self.queue = WorkQueue(self.db, svc.queue_strategy, svc.lease_s)
        self.backends = Backends(svc.grpc_target("inference"), svc.grpc_target("training"))
        self.background = Tasks()  # MONAI Label's batch inference and scoring tasks
        self.volumes = VolumeCache()
        self.slice_reads = SliceReads()

    def published(self) -> None:
        """Wake the outbox relay: an event was staged."""
        if self.relay is not None:
            self.relay.notify()


def get_context(request: Request) -> IngestContext:
    ctx: IngestContext = request.app.state.ingest
    return ctx


Context = Annotated[IngestContext, Depends(get_context)]


def signed_in(request: Request) -> Principal:
    """Any valid bearer token (401 otherwise)."""
    return get_context(request).auth.principal(request)


def requires(*roles: str) -> Callable[..., Principal]:
    """A dependency: the caller, if their role is one of ``roles`` (403 otherwise)."""

    def dependency(request: Request, who: Annotated[Principal, Depends(signed_in)]) -> Principal:
        if who.role not in roles:
            reason = f"role {who.role} may not do this"
            where = f"{request.method} {request.url.path}"
            address = request.client.host if request.client else "unknown"
            get_context(request).auth_audit.denied(who, address, where, reason)
            raise ApiError("forbidden", reason, 403)
        return who

    dependency.__name__ = f"requires_{'_'.join(roles)}"
    return dependency


# The roles each kind of call needs (named once; routers use these, never role strings).
SignedIn = Annotated[Principal, Depends(signed_in)]
Anyone = Annotated[Principal, Depends(requires(*ROLES))]
Uploader = Annotated[Principal, Depends(requires("admin", "integration", "reviewer"))]
Annotator = Annotated[Principal, Depends(requires("admin", "reviewer", "annotator"))]
Reviewer = Annotated[Principal, Depends(requires("admin", "reviewer"))]
Admin = Annotated[Principal, Depends(requires("admin"))]


async def read_upload(ctx: IngestContext, upload: UploadFile, what: str) -> bytes:
    """A multipart file part, refused (413) as soon as it passes the size limit."""

    async def chunks() -> AsyncIterator[bytes]:
        while chunk := await upload.read(1024 * 1024):
            yield chunk

    return await _collect(ctx.limits, chunks(), what)


async def read_body(ctx: IngestContext, request: Request, what: str) -> bytes:
    """A raw request body, refused (413) by its declared length or as soon as it passes the
    size limit."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > ctx.limits.max_bytes:
        raise too_large(ctx.limits, what)
    return await _collect(ctx.limits, request.stream(), what)


async def _collect(limits: Limits, chunks: AsyncIterator[bytes], what: str) -> bytes:
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limits.max_bytes:
            raise too_large(limits, what)
        parts.append(chunk)
    if size == 0:
        raise ApiError("empty", f"the {what} is empty")
    return b"".join(parts)


def too_large(limits: Limits, what: str) -> ApiError:
    return ApiError("too_large", f"the {what} exceeds {limits.max_bytes} bytes", 413)

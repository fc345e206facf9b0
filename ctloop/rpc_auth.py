"""Who may call which gRPC method between ctloop's services, and how a call proves its caller.

Every call carries ``authorization: Bearer <token>`` and ``x-ctloop-caller: <name>``; the
server checks the token against the SHA-256 digest it holds for that caller (a server never
holds another service's token, so a compromised pod cannot pass for its callers) and then
whether :data:`CALLS` lets that caller use the method. No token, a wrong one or an unknown
caller: ``UNAUTHENTICATED``; a method the caller may not use: ``PERMISSION_DENIED``. The
standard health service stays open (probes and ``helm test`` dial it without credentials).

Where tokens come from: in a cluster the chart's Secret gives each service its own token
(``grpc.token``) and each server the digests of its callers (``grpc.callers``). Locally the
launcher writes every caller's token to ``<run_dir>/grpc-tokens.json`` (0600) and each process
reads what it needs from there (:func:`ensure_tokens_file`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, NamedTuple

import grpc

from ctloop.grpc_tls import TlsPair, channel_credentials, load, peer_name
from ctloop.settings import Settings
from ctloop.v1 import inference_pb2, ingest_pb2, metrics_pb2, training_pb2

log = logging.getLogger(__name__)

Caller = Literal["ingest", "training", "operator"]
# Services that call others, and the operator (``ctloop run``, benchmarks, tests and admins
# reaching a release): each has its own token.
CALLERS: tuple[Caller, ...] = ("ingest", "training", "operator")
CALLER_HEADER = "x-ctloop-caller"

# The gRPC services of proto/ctloop/v1 and the ctloop service that serves each.
_SERVED_BY: dict[str, tuple[ModuleType, str]] = {
    "Workflow": (ingest_pb2, "ingest"),
    "Inference": (inference_pb2, "inference"),
    "Training": (training_pb2, "training"),
    "Metrics": (metrics_pb2, "metrics"),
}


def method(service: str, name: str) -> str:
    """The wire name of ``service.name`` (``/ctloop.v1.Training/StartRound``), looked up in the
    generated descriptors so a misspelt or removed method fails at import."""
    module, _ = _SERVED_BY[service]
    rpc = module.DESCRIPTOR.services_by_name[service].methods_by_name[name]
    return f"/{rpc.containing_service.full_name}/{rpc.name}"


def _all_methods(service: str) -> set[str]:
    module, _ = _SERVED_BY[service]
    names = module.DESCRIPTOR.services_by_name[service].methods_by_name
    return {method(service, name) for name in names}


# Which caller may use which method: the one table the servers enforce and the chart's token
# mounts and flows (helm/ctloop/files/flows.yaml, tests/helm/test_grpc_auth.py) agree with.
CALLS: dict[Caller, frozenset[str]] = {
    # MONAI Label's infer, train and model-info endpoints, the workbench's round status.
    "ingest": frozenset(
        {
            method("Inference", "Segment"),
            method("Inference", "SegmentSession"),
            method("Inference", "GetModelStatus"),
            method("Training", "StartRound"),
            method("Training", "ListRounds"),
            method("Training", "ListModelVersions"),
        }
    ),
    # The corrected volumes of a round.
    "training": frozenset({method("Workflow", "ListTrainingVolumes")}),
    # Operators drive and watch rounds, models and reports; the workflow data stays ingest's.
    "operator": frozenset(
        _all_methods("Inference") | _all_methods("Training") | _all_methods("Metrics")
    ),
}

# Open to anyone who reaches the port: liveness/readiness only, no data.
OPEN_PREFIX = "/grpc.health.v1.Health/"


def served_by(full_method: str) -> str:
    """The ctloop service that serves ``/ctloop.v1.<Service>/<Method>``."""
    return _SERVED_BY[full_method.split("/")[1].rsplit(".", 1)[-1]][1]


def callers_of(service: str) -> set[Caller]:
    """The callers ``service`` must be able to authenticate (those :data:`CALLS` lets use any
    of its methods)."""
    return {c for c, methods in CALLS.items() if any(served_by(m) == service for m in methods)}


def digest(token: str) -> str:
    """What a server keeps of a caller's token: its hex SHA-256 (tokens are 256-bit random)."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "ctg_" + secrets.token_urlsafe(32)


# ----------------------------------------------------------------------------- local tokens
def read_tokens_file(path: Path) -> dict[str, str]:
    """The tokens in ``path`` (caller -> token); empty when the file does not exist."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return {str(k): str(v) for k, v in data.items()}


def ensure_tokens_file(path: Path) -> dict[str, str]:
    """Every caller's token in ``path``, created (mode 0600, atomically: concurrent starts all
    end with the same file) when it does not exist yet; an existing file is kept, so services
    started earlier keep their tokens."""
    found = read_tokens_file(path)
    if found:
        return found
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({c: new_token() for c in CALLERS}, f)
    try:
        os.link(tmp, path)  # fails if another process made it first: theirs wins
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return read_tokens_file(path)


def own_token(settings: Settings, caller: Caller) -> str:
    """The token ``caller`` sends: the configured one, else the local tokens file's ("" when
    there is none: the call goes out unauthenticated and is refused)."""
    if settings.grpc.token is not None:
        return settings.grpc.token.get_secret_value()
    return read_tokens_file(settings.grpc_tokens_file).get(caller, "")


def accepted_digests(settings: Settings) -> dict[str, str]:
    """Caller -> token digest a server accepts: the configured ones, else those of the local
    tokens file (made now if no launcher wrote it, e.g. a service started by hand)."""
    if settings.grpc.callers:
        return {name.lower(): d.lower() for name, d in settings.grpc.callers.items()}
    return {c: digest(t) for c, t in ensure_tokens_file(settings.grpc_tokens_file).items()}


# ----------------------------------------------------------------------------- client side
class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _CallerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the caller's name and token to every call of a channel."""

    def __init__(self, caller: str, token: str) -> None:
        self._metadata = [(CALLER_HEADER, caller)]
        if token:
            self._metadata.append(("authorization", f"Bearer {token}"))

    def _with_token(self, details: grpc.ClientCallDetails) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or []), *self._metadata],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


def channel(
    target: str,
    caller: str,
    token: str,
    options: Sequence[tuple[str, Any]] | None = None,
    tls: TlsPair | None = None,
) -> grpc.Channel:
    """A channel to ``target`` whose every call says it comes from ``caller`` with ``token``;
    with ``tls`` (``caller``'s pair, :mod:`ctloop.grpc_tls`) over mutual TLS."""
    if tls is None:
        base = grpc.insecure_channel(target, options=options)
    else:
        base = grpc.secure_channel(target, channel_credentials(tls), options=options)
    return grpc.intercept_channel(base, _CallerInterceptor(caller, token))


def service_channel(
    settings: Settings,
    caller: Caller,
    target: str,
    options: Sequence[tuple[str, Any]] | None = None,
) -> grpc.Channel:
    """:func:`channel` with ``caller``'s own token and, when ``grpc.tls_dir`` is set, its own
    TLS pair from ``settings``."""
    return channel(target, caller, own_token(settings, caller), options, load(settings, caller))


# ----------------------------------------------------------------------------- server side
def _refusal(code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    def refuse(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    return grpc.unary_unary_rpc_method_handler(refuse)


def _bound_to_peer(handler: grpc.RpcMethodHandler, caller: str) -> grpc.RpcMethodHandler:
    """``handler``, refusing (UNAUTHENTICATED) a call whose client certificate is not
    ``caller``'s: over mutual TLS the token and the certificate must name the same party."""

    def guard(behaviour: Callable[..., Any]) -> Callable[..., Any]:
        def checked(request: Any, context: grpc.ServicerContext) -> Any:
            peer = peer_name(context)
            if peer != caller:
                log.warning(
                    "gRPC call refused",
                    extra={"caller": caller, "certificate": peer, "code": "UNAUTHENTICATED"},
                )
                context.abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    "the client certificate is not the calling service's",
                )
            return behaviour(request, context)

        return checked

    kinds = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")
    wrapped = {k: guard(getattr(handler, k)) for k in kinds if getattr(handler, k) is not None}
    return handler._replace(**wrapped)


class CallerAuthInterceptor(grpc.ServerInterceptor):
    """Lets a call through only when its caller proves its token and :data:`CALLS` allows it
    the method; the health service is open. With ``mutual_tls`` (the server requires client
    certificates) the caller must also be the name in the call's client certificate."""

    def __init__(self, accepted: Mapping[str, str], mutual_tls: bool = False) -> None:
        self.accepted = dict(accepted)
        self.mutual_tls = mutual_tls

    def check(self, full_method: str, metadata: Mapping[str, str]) -> tuple[grpc.StatusCode, str]:
        """``(OK, caller)`` or the refusal's code and message (which names no secret)."""
        caller = metadata.get(CALLER_HEADER, "")
        scheme, _, token = metadata.get("authorization", "").partition(" ")
        expected = self.accepted.get(caller)
        if expected is None or scheme.lower() != "bearer" or not token:
            return grpc.StatusCode.UNAUTHENTICATED, "a service token is required"
        if not hmac.compare_digest(digest(token), expected):
            return grpc.StatusCode.UNAUTHENTICATED, "the service token is not valid"
        if full_method not in CALLS.get(caller, frozenset()):  # type: ignore[call-overload]
            return grpc.StatusCode.PERMISSION_DENIED, f"{caller} may not call {full_method}"
        return grpc.StatusCode.OK, caller

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        full_method: str = handler_call_details.method
        if full_method.startswith(OPEN_PREFIX):
            return continuation(handler_call_details)
        metadata = {
            k: v if isinstance(v, str) else v.decode()
            for k, v in handler_call_details.invocation_metadata
        }
        code, detail = self.check(full_method, metadata)
        if code == grpc.StatusCode.OK:
            handler = continuation(handler_call_details)
            if self.mutual_tls and handler is not None:
                return _bound_to_peer(handler, detail)  # detail: the caller
            return handler
        log.warning(
            "gRPC call refused",
            extra={
                "method": full_method,
                "caller": metadata.get(CALLER_HEADER, "")[:64],
                "code": code.name,
            },
        )
        return _refusal(code, detail)


def server_interceptor(settings: Settings) -> CallerAuthInterceptor:
    """The interceptor a ctloop service's gRPC server runs every call through."""
    return CallerAuthInterceptor(
        accepted_digests(settings), mutual_tls=settings.grpc.tls_dir is not None
    )

"""The one error type of the ingest API, and how every failure becomes a JSON answer.

Every refusal is an :class:`ApiError` with a stable ``code`` (what a client can act on), an HTTP
status and a message saying what was wrong; the body is always ``{"code", "message"}`` (plus
``errors`` for request validation), whatever raised it: a handler, a dependency, the upload
checks, or FastAPI's own routing and validation.
"""

from __future__ import annotations

import logging

import urllib3
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from minio.error import ServerError
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("ctloop.ingest")

# What routing itself answers (no such path, wrong method), as codes.
_ROUTING_CODES = {404: "not_found", 405: "method_not_allowed"}


class ApiError(Exception):
    """A refusal: ``code`` for programs, ``message`` for people, ``status`` for HTTP."""

    def __init__(
        self, code: str, message: str, status: int = 422, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status
        self.headers = headers


class BodyTooLarge(StarletteHTTPException):
    """A body that passed the limit while it was being read: 413 and the connection closed, so
    the rest is never read. An HTTPException because FastAPI turns any other exception raised
    while it parses a form into a 400; answered as :attr:`refusal`."""

    def __init__(self, limit: int) -> None:
        message = f"the request body exceeds {limit} bytes"
        headers = {"Connection": "close"}
        self.refusal = ApiError("too_large", message, 413, headers)
        super().__init__(413, message, headers)


def not_found(message: str, code: str = "not_found") -> ApiError:
    return ApiError(code, message, 404)


def conflict(code: str, message: str) -> ApiError:
    return ApiError(code, message, 409)


async def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return JSONResponse(
        {"code": exc.code, "message": exc.message}, status_code=exc.status, headers=exc.headers
    )


async def _body_too_large(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, BodyTooLarge)
    return await _api_error(request, exc.refusal)


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _ROUTING_CODES.get(exc.status_code, "error")
    return JSONResponse(
        {"code": code, "message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
    )


async def _invalid(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"where": ".".join(str(p) for p in e.get("loc", ())), "problem": e.get("msg", "")}
        for e in exc.errors()
    ]
    problems = "; ".join(f"{e['where']}: {e['problem']}" for e in errors)
    return JSONResponse(
        {"code": "invalid_request", "message": problems, "errors": errors}, status_code=422
    )


# A storage dependency (object store, database) not answering: the request changed nothing
# that stays (S3 objects without their database row are unreferenced), so it can be retried.
DEPENDENCY_DOWN: tuple[type[Exception], ...] = (
    urllib3.exceptions.HTTPError,
    OperationalError,
    ServerError,
)


def unavailable(exc: Exception) -> ApiError:
    """The 503 answer to one of :data:`DEPENDENCY_DOWN` (logged; its text is not sent)."""
    log.warning("dependency unavailable", extra={"error": f"{type(exc).__name__}: {exc}"})
    return ApiError(
        "unavailable",
        "a storage dependency is not answering; retry shortly",
        503,
        {"Retry-After": "5"},
    )


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    return await _api_error(request, unavailable(exc))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_exception_handler(StarletteHTTPException, _http_error)  # routing's 404/405 too
    app.add_exception_handler(RequestValidationError, _invalid)
    for kind in DEPENDENCY_DOWN:
        app.add_exception_handler(kind, _unavailable)

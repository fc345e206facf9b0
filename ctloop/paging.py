"""Pages of the HTTP list endpoints (ingest's volumes, annotations, sites, audit log; the
metrics service's runs): a ``limit`` and an opaque ``cursor`` in the query, the body still the
plain JSON list it always was, and the next page named in headers.

``limit`` is 1..:data:`MAX_LIMIT` (default :data:`DEFAULT_LIMIT`); a larger one is refused
(422), not clamped, so a client never silently gets less than it asked for. When more items
follow, the answer carries ``X-Next-Cursor: <cursor>`` and ``Link: <url>; rel="next"`` (RFC
8288); the last page carries neither. A cursor is the sort key of the last item a page held
(keyset paging), so items added or removed meanwhile never shift a later page: every item
present throughout is listed exactly once.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
NEXT_CURSOR = "X-Next-Cursor"

T = TypeVar("T")
Key = list[Any]  # the JSON values a list is sorted by (e.g. [created_at, id])


@dataclass(frozen=True)
class PageRequest:
    """What a caller asked for: at most ``limit`` items after the one ``after`` names."""

    limit: int
    after: Key | None

    @property
    def fetch(self) -> int:
        """How many rows to read: one more than the page, to know whether another follows."""
        return self.limit + 1

    def after_key(self, *kinds: type) -> tuple[Any, ...] | None:
        """The cursor's key as values of ``kinds`` (``str``, ``int``, ``datetime``), None on
        the first page; a cursor of another shape is refused (422)."""
        if self.after is None:
            return None
        if len(self.after) != len(kinds):
            raise _bad_cursor()
        try:
            return tuple(_as(kind, value) for kind, value in zip(kinds, self.after, strict=True))
        except (TypeError, ValueError):
            raise _bad_cursor() from None


def _as(kind: type, value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise TypeError("a cursor holds strings and integers")
    if kind is datetime:
        return datetime.fromisoformat(str(value))
    if kind is int:
        return int(value)
    return str(value)


def _bad_cursor() -> RequestValidationError:
    return RequestValidationError(
        [{"loc": ("query", "cursor"), "msg": "not a cursor this API gave", "type": "value"}]
    )


def encode_cursor(key: Key) -> str:
    return base64.urlsafe_b64encode(json.dumps(key, default=str).encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> Key:
    """The key in a cursor this API gave (422 ``invalid_request`` otherwise)."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        key = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        key = None
    if not isinstance(key, list) or not key:
        raise _bad_cursor()
    return key


def page_request(
    limit: Annotated[
        int, Query(ge=1, le=MAX_LIMIT, description=f"items per page (at most {MAX_LIMIT})")
    ] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None, Query(max_length=1024, description="X-Next-Cursor of the previous page")
    ] = None,
) -> PageRequest:
    return PageRequest(limit, decode_cursor(cursor) if cursor else None)


Page = Annotated[PageRequest, Depends(page_request)]


def one_page(
    rows: Sequence[T],
    page: PageRequest,
    key: Callable[[T], Key],
    request: Request,
    response: Response,
) -> list[T]:
    """The first ``page.limit`` of ``rows`` (read with ``page.fetch``), and the headers that
    name the next page when there is one."""
    if len(rows) <= page.limit:
        return list(rows)
    shown = list(rows[: page.limit])
    cursor = encode_cursor(key(shown[-1]))
    response.headers[NEXT_CURSOR] = cursor
    url = request.url.include_query_params(cursor=cursor, limit=page.limit)
    response.headers["Link"] = f'<{url}>; rel="next"'
    return shown

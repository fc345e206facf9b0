"""Failed sign-ins (401) and refused calls (403) in the audit log, rate-limited per client.

A reviewer asks who tried what and was refused; an attacker must not be able to fill the table
(or the database's disk) by sending bad tokens. So each client address gets at most
``per_minute`` rows a minute; the first refusal over that writes one ``auth.suppressed`` row,
and the client's next row after the minute says how many were left out (``suppressed_before``).
Addresses beyond ``max_clients`` tracked at once share one overflow budget, so many addresses
cannot multiply the rows either.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from ctloop.audit_chain import audit
from ctloop.auth import TOKEN_PREFIX, Principal, token_hash
from ctloop.db import ApiToken, User, session_scope

ANONYMOUS = "anonymous"
OVERFLOW = "*"  # the shared budget of addresses past max_clients
WINDOW_S = 60.0
Decision = Literal["write", "summary", "drop"]


@dataclass
class _Window:
    start: float
    written: int = 0
    dropped: int = 0


class RateLimit:
    """At most ``per_minute`` admissions per key and minute, then one ``summary``, then drops."""

    def __init__(
        self,
        per_minute: int,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_minute = per_minute
        self.max_clients = max_clients
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def admit(self, key: str) -> tuple[Decision, int]:
        """(what to do with this event, how many of the key's events its last window dropped:
        reported once, with the first event written after it)."""
        now = self.clock()
        with self._lock:
            if key not in self._windows and len(self._windows) >= self.max_clients:
                self._forget_expired(now)
                if len(self._windows) >= self.max_clients:
                    key = OVERFLOW
            window = self._windows.get(key)
            if window is None or now - window.start >= WINDOW_S:
                self._windows[key] = _Window(start=now, written=1)
                return "write", window.dropped if window is not None else 0
            if window.written < self.per_minute:
                window.written += 1
                return "write", 0
            window.dropped += 1
            return ("summary" if window.dropped == 1 else "drop"), 0

    def _forget_expired(self, now: float) -> None:
        for k in [k for k, w in self._windows.items() if now - w.start >= 2 * WINDOW_S]:
            del self._windows[k]


class AuthAudit:
    """Writes ``auth.failed`` (401) and ``auth.denied`` (403) rows, rate-limited per address."""

    def __init__(self, database_url: str, per_minute: int) -> None:
        self.db = database_url
        self.limit = RateLimit(per_minute)

    def failed(self, address: str, where: str, authorization: str, code: str) -> None:
        """A request without a valid credential (``code``: unauthenticated / bad_token)."""
        left_out = self._admitted(address, where)
        if left_out is None:
            return
        actor, reason = self._who_failed(authorization, code)
        detail = {"reason": reason, "code": code, "client": address}
        self._write(actor, "auth.failed", where, left_out, detail)

    def denied(self, who: Principal, address: str, where: str, reason: str) -> None:
        """A signed-in caller whose role may not do ``where``."""
        left_out = self._admitted(address, where)
        if left_out is None:
            return
        detail = {"reason": reason, "role": who.role, "client": address}
        self._write(who.user_id, "auth.denied", where, left_out, detail)

    def _admitted(self, address: str, where: str) -> int | None:
        """How many refusals from ``address`` went unwritten before this one, if this one is
        written; None if it is not (over the limit: the first such writes a summary row)."""
        decision, left_out = self.limit.admit(address)
        if decision == "summary":
            self._suppressed(address, where)
        return left_out if decision == "write" else None

    def _suppressed(self, address: str, where: str) -> None:
        detail = {
            "client": address,
            "reason": f"more than {self.limit.per_minute} refusals from this address in a "
            "minute; the rest of the minute's are counted, not written",
        }
        self._write(ANONYMOUS, "auth.suppressed", where, 0, detail)

    def _write(
        self, actor: str, action: str, where: str, left_out: int, detail: dict[str, Any]
    ) -> None:
        if left_out:
            detail["suppressed_before"] = left_out
        with session_scope(self.db) as s:
            audit(s, actor, action, where[:512], **detail)

    def _who_failed(self, authorization: str, code: str) -> tuple[str, str]:
        """(the user a refused credential belongs to, else anonymous; why it was refused).
        A ``ctl_`` token whose hash is on file is that user's real token (revoked, expired, or
        the user disabled); an OIDC token's claims are not trusted unverified, so its caller
        stays anonymous."""
        if code == "unauthenticated":
            return ANONYMOUS, "no bearer token"
        token = authorization.partition(" ")[2].strip()
        if not token.startswith(TOKEN_PREFIX):
            return ANONYMOUS, "OIDC token refused (signature, issuer, audience, expiry or claims)"
        with session_scope(self.db) as s:
            row = s.get(ApiToken, token_hash(token))
            if row is None:
                return ANONYMOUS, "unknown API token"
            user = s.get(User, row.user_id)
            if row.revoked_at is not None:
                return row.user_id, "revoked API token"
            if row.expires_at is not None and _aware(row.expires_at) <= datetime.now(UTC):
                return row.user_id, "expired API token"
            if user is not None and user.disabled_at is not None:
                return row.user_id, "disabled user"
            return row.user_id, "API token refused"


def _aware(at: datetime) -> datetime:
    """SQLite gives back naive datetimes (stored as UTC)."""
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)

"""The audit log's hash chain: writing an entry (:func:`audit`) and checking the chain.

Each row carries ``prev_hash`` (the previous row's ``entry_hash``) and ``entry_hash`` (SHA-256
over ``prev_hash`` and the row's own fields). Walking the rows in id order finds the first one
whose contents no longer match its hash (edited), whose ``prev_hash`` is not the hash of the row
before it (a row deleted before it, or one inserted), or that has no hash inside the chain
(inserted by hand). Rows written before the chain existed (migration 0005) have empty hashes
and are counted as ``before_chain``, not as tampering.

Limits, stated plainly: the chain has no secret, so someone who can write the database can
rewrite every hash from the row they changed to the end; and deleting the newest rows leaves a
shorter chain that is still whole. Both are caught only against an anchor kept outside the
database: the ``head`` (id and hash) a previous check reported, given back as ``anchor``; the
anchored row must still be there with the same hash.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ctloop.db import AuditEntry, session_scope

# pg_advisory_xact_lock key that serialises writers of the audit chain (any constant unique to
# this purpose; "ctloop audit" in ASCII, truncated to 63 bits).
AUDIT_CHAIN_LOCK = 0x63746C6F6F7061


def audit(
    session: Session,
    actor: str,
    action: str,
    resource: str,
    site_id: str | None = None,
    **detail: Any,
) -> None:
    """Append an entry to the audit log, chained to the one before it: ``prev_hash`` is the
    previous row's ``entry_hash`` and ``entry_hash`` = SHA-256 over ``prev_hash`` and this row's
    fields (:func:`audit_entry_hash`), so an edited, inserted or deleted row breaks the chain
    (``ctloop admin audit verify``, :mod:`ctloop.audit_chain`).

    Writers never fork the chain: on PostgreSQL the transaction takes an advisory lock held to
    its commit before it reads the last hash; SQLite has one writer at a time, and the row is
    inserted (taking the write lock) before the previous one is read.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(select(func.pg_advisory_xact_lock(AUDIT_CHAIN_LOCK)))
    entry = AuditEntry(
        at=datetime.now(UTC),
        actor=actor,
        action=action,
        resource=resource,
        site_id=site_id,
        detail=json.loads(_canonical_json(detail)),  # stored as it is hashed
    )
    session.add(entry)
    session.flush()
    prev = session.scalar(
        select(AuditEntry.entry_hash)
        .where(AuditEntry.id < entry.id)
        .order_by(AuditEntry.id.desc())
        .limit(1)
    )
    entry.prev_hash = prev or ""
    entry.entry_hash = audit_entry_hash(entry)
    session.flush()


def audit_entry_hash(entry: AuditEntry) -> str:
    """SHA-256 (hex) of ``entry.prev_hash`` followed by the canonical JSON of its fields."""
    fields = {
        "id": entry.id,
        "at": entry.at.astimezone(UTC).isoformat(),
        "actor": entry.actor,
        "action": entry.action,
        "resource": entry.resource,
        "site_id": entry.site_id,
        "detail": entry.detail,
    }
    return hashlib.sha256((entry.prev_hash + _canonical_json(fields)).encode()).hexdigest()


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


@dataclass(frozen=True)
class ChainProblem:
    id: int
    kind: str  # edited | link_broken | unhashed | anchor_missing | anchor_changed
    message: str


@dataclass(frozen=True)
class ChainReport:
    ok: bool
    rows: int  # every row read
    before_chain: int  # rows written before the chain existed (empty hashes)
    head_id: int | None  # the newest chained row: keep it (with its hash) as the next anchor
    head_hash: str | None
    problem: ChainProblem | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_row(row: AuditEntry, prev_hash: str | None) -> ChainProblem | None:
    """What is wrong with ``row`` given the hash of the chained row before it (None: the
    chain has not started; rows before it have no hash)."""
    if not row.entry_hash:
        if prev_hash is None:
            return None
        return ChainProblem(row.id, "unhashed", "a row without a hash inside the chain (inserted)")
    if audit_entry_hash(row) != row.entry_hash:
        return ChainProblem(row.id, "edited", "the row's contents do not match its hash (edited)")
    if row.prev_hash != (prev_hash or ""):
        return ChainProblem(
            row.id,
            "link_broken",
            "its prev_hash is not the hash of the row before it "
            "(a row before it was deleted, or one was inserted)",
        )
    return None


def verify_chain(database_url: str, anchor: tuple[int, str] | None = None) -> ChainReport:
    """Walk the audit log from the oldest row and report the first problem (see the module
    docstring); ``anchor`` is an (id, entry_hash) an earlier check reported as its head."""
    rows = before = 0
    prev_hash: str | None = None
    head_id: int | None = None
    anchored: str | None = None
    problem: ChainProblem | None = None
    with session_scope(database_url) as s:
        for row in s.scalars(
            select(AuditEntry).order_by(AuditEntry.id).execution_options(yield_per=500)
        ):
            rows += 1
            problem = _check_row(row, prev_hash)
            if problem is not None:
                break
            if not row.entry_hash:
                before += 1
                continue
            prev_hash, head_id = row.entry_hash, row.id
            if anchor is not None and row.id == anchor[0]:
                anchored = row.entry_hash
    if problem is None and anchor is not None:
        problem = _check_anchor(anchor, anchored)
    return ChainReport(problem is None, rows, before, head_id, prev_hash, problem)


def _check_anchor(anchor: tuple[int, str], found: str | None) -> ChainProblem | None:
    if found is None:
        return ChainProblem(
            anchor[0], "anchor_missing", "the anchored row is gone (rows deleted, the last too)"
        )
    if found != anchor[1]:
        return ChainProblem(
            anchor[0], "anchor_changed", "the anchored row's hash changed (the chain was rewritten)"
        )
    return None


def parse_anchor(text: str) -> tuple[int, str]:
    """``ID:HASH`` (a head an earlier check printed) as an anchor; ValueError otherwise."""
    ident, sep, digest = text.partition(":")
    if not sep or not ident.isdigit() or len(digest) != 64:
        raise ValueError("an anchor is ID:SHA256 (the head a previous check reported)")
    int(digest, 16)
    return int(ident), digest.lower()

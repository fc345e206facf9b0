"""Checking the audit log's hash chain (written by :func:`ctloop.db.audit`).

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

from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import select

from ctloop.db import AuditEntry, audit_entry_hash, session_scope


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

"""The audit log's hash chain (issue 18, finding 8) on SQLite and on a real PostgreSQL server:
concurrent writers (several ingest replicas) never fork it, and ``verify_chain`` finds the first
edited or deleted row, the deleted newest rows against an anchor, and tells rows written before
the chain from tampering."""

from __future__ import annotations

import threading

from sqlalchemy import func, select, text

from ctloop.audit_chain import audit, verify_chain
from ctloop.db import AuditEntry, session_scope
from tests.integration.test_database import db_url, postgres_settings  # noqa: F401 (fixtures)

WRITERS = 6
ENTRIES_EACH = 10


def _write(url: str, n: int, actor: str = "tester") -> None:
    for i in range(n):
        with session_scope(url) as s:
            audit(s, actor, "volume.read", f"vol-{i}", site_id="site-a", ip="127.0.0.1", n=i)


def test_concurrent_writers_keep_one_unforked_chain(db_url):  # noqa: F811
    barrier = threading.Barrier(WRITERS)
    errors: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            barrier.wait()
            _write(db_url, ENTRIES_EACH, actor=f"replica-{k}")
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(WRITERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    report = verify_chain(db_url)
    assert report.ok, report.problem
    assert report.rows == WRITERS * ENTRIES_EACH and report.before_chain == 0
    with session_scope(db_url) as s:
        prevs = s.scalars(select(AuditEntry.prev_hash)).all()
        last = s.scalar(select(func.max(AuditEntry.id)))
    assert len(set(prevs)) == len(prevs)  # no two rows follow the same row: no fork
    assert report.head_id == last


def test_an_edited_row_is_reported(db_url):  # noqa: F811
    _write(db_url, 5)
    assert verify_chain(db_url).ok
    with session_scope(db_url) as s:
        ids = s.scalars(select(AuditEntry.id).order_by(AuditEntry.id)).all()
        s.execute(
            text("UPDATE audit_log SET detail = :d WHERE id = :i"),
            {"d": '{"ip": "10.0.0.66", "n": 2}', "i": ids[2]},
        )
    report = verify_chain(db_url)
    assert not report.ok and report.problem is not None
    assert (report.problem.id, report.problem.kind) == (ids[2], "edited")


def test_a_deleted_middle_row_is_reported_at_the_row_after_it(db_url):  # noqa: F811
    _write(db_url, 5)
    with session_scope(db_url) as s:
        ids = s.scalars(select(AuditEntry.id).order_by(AuditEntry.id)).all()
        s.execute(text("DELETE FROM audit_log WHERE id = :i"), {"i": ids[2]})
    report = verify_chain(db_url)
    assert not report.ok and report.problem is not None
    assert (report.problem.id, report.problem.kind) == (ids[3], "link_broken")


def test_deleted_newest_rows_are_caught_against_an_anchor(db_url):  # noqa: F811
    _write(db_url, 5)
    head = verify_chain(db_url)
    assert head.ok and head.head_id is not None and head.head_hash is not None
    anchor = (head.head_id, head.head_hash)
    _write(db_url, 2)
    assert verify_chain(db_url, anchor).ok  # the chain grew past the anchor: fine
    with session_scope(db_url) as s:
        s.execute(text("DELETE FROM audit_log WHERE id >= :i"), {"i": head.head_id})
    # Without an anchor a shorter chain is still whole (the documented limit) ...
    assert verify_chain(db_url).ok
    # ... with the head kept from before, the deletion shows.
    report = verify_chain(db_url, anchor)
    assert not report.ok and report.problem is not None
    assert (report.problem.id, report.problem.kind) == (head.head_id, "anchor_missing")


def test_rows_from_before_the_chain_are_not_tampering(db_url):  # noqa: F811
    with session_scope(db_url) as s:  # as migration 0005 found them: no hashes
        for i in range(3):
            s.execute(
                text(
                    "INSERT INTO audit_log (at, actor, action, resource, site_id, detail) "
                    "VALUES (:at, 'old', 'volume.read', :r, NULL, '{}')"
                ),
                {"at": "2026-01-01 00:00:00", "r": f"old-{i}"},
            )
    _write(db_url, 3)
    report = verify_chain(db_url)
    assert report.ok, report.problem
    assert (report.rows, report.before_chain) == (6, 3)
    # A hash-less row inside the chain is not "before" it.
    with session_scope(db_url) as s:
        last = s.scalar(select(func.max(AuditEntry.id)))
        s.execute(
            text("UPDATE audit_log SET prev_hash = '', entry_hash = '' WHERE id = :i"),
            {"i": last - 1},
        )
    report = verify_chain(db_url)
    assert report.problem is not None
    assert (report.problem.id, report.problem.kind) == (last - 1, "unhashed")

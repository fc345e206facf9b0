"""Failed sign-ins and refused calls are in the audit log, rate-limited per client address
(issue 18, finding 8): a reviewer sees who tried what; a flood of bad tokens writes a bounded
number of rows."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from ctloop.auth import issue_token, revoke_token, token_hash
from ctloop.db import AuditEntry, session_scope
from services.ingest.app import create_app

PER_MINUTE = 3


@pytest.fixture(scope="module")
def app(svc_settings):
    auth = svc_settings.auth.model_copy(update={"refusals_audited_per_minute": PER_MINUTE})
    return create_app(svc_settings.model_copy(update={"auth": auth}))


def _refusals(settings, since: int) -> list[AuditEntry]:
    with session_scope(settings.database_url) as s:
        q = select(AuditEntry).where(AuditEntry.id > since, AuditEntry.action.like("auth.%"))
        return list(s.scalars(q.order_by(AuditEntry.id)))


def _last_id(settings) -> int:
    with session_scope(settings.database_url) as s:
        return s.scalar(select(AuditEntry.id).order_by(AuditEntry.id.desc()).limit(1)) or 0


def test_failed_sign_ins_and_denials_are_audited_with_who_why_and_from_where(
    app, svc_settings, admin_headers, unique
):
    """The module's app keeps TestClient's address (``testclient``) under its rate limit for
    the flood test, so these refusals go through an app of their own."""
    with TestClient(app, headers=admin_headers) as admin:
        user = f"ann-{unique}"
        assert admin.post(
            "/v1/users", json={"id": user, "role": "annotator", "sites": []}
        ).is_success
    token = issue_token(svc_settings.database_url, user, "audit-test")
    since = _last_id(svc_settings)
    with TestClient(create_app(svc_settings)) as c:
        assert c.get("/v1/volumes").status_code == 401
        assert c.get("/v1/audit", headers={"Authorization": f"Bearer {token}"}).status_code == 403
        assert revoke_token(svc_settings.database_url, token_hash(token))
        revoked = c.get("/v1/volumes", headers={"Authorization": f"Bearer {token}"})
        assert revoked.status_code == 401
        # MONAI Label's sign-in (a public route: the token comes in the form) is audited too
        form = {"username": user, "password": token}
        assert c.post("/auth/token", data=form).status_code == 401
    found = _refusals(svc_settings, since)
    rows = [(r.actor, r.action, r.resource, r.detail["reason"]) for r in found]
    assert rows == [
        ("anonymous", "auth.failed", "GET /v1/volumes", "no bearer token"),
        (user, "auth.denied", "GET /v1/audit", "role annotator may not do this"),
        (user, "auth.failed", "GET /v1/volumes", "revoked API token"),
        (user, "auth.failed", "POST /auth/token", "revoked API token"),
    ]
    assert all(r.detail["client"] == "testclient" for r in found)
    # An admin reads them like every other audit entry.
    with TestClient(app, headers=admin_headers) as admin:
        listed = admin.get("/v1/audit", params={"resource": "GET /v1/audit"}).json()
    assert any(e["action"] == "auth.denied" and e["actor"] == user for e in listed)


def test_a_flood_of_forged_tokens_writes_a_bounded_number_of_rows(app, svc_settings):
    since = _last_id(svc_settings)
    with TestClient(app) as c:
        for i in range(25):
            forged = {"Authorization": f"Bearer ctl_forged-{i}"}
            assert c.post("/v1/volumes", headers=forged).json()["code"] == "bad_token"
    rows = _refusals(svc_settings, since)
    assert [r.action for r in rows] == ["auth.failed"] * PER_MINUTE + ["auth.suppressed"]
    assert rows[0].actor == "anonymous" and rows[0].detail["reason"] == "unknown API token"

"""Token lifecycle (issue 18, finding 6) and the audit chain check (finding 8) through the admin
API and ``ctloop admin``: tokens expire (a default lifetime and one per token), are listed and
revoked; a disabled user's tokens and OIDC tokens are refused and nothing of theirs is deleted;
each change is audited; ``ctloop admin audit verify`` finds an edited row."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import jwt
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import select, text

from ctloop.cli import main as ctloop
from ctloop.db import ApiToken, AuditEntry, session_scope
from ctloop.settings import Settings
from services.ingest.app import create_app
from tests.helpers.net import free_port

SITE = "life-site"


@pytest.fixture(scope="module")
def settings_oidc(svc_settings: Settings, oidc_issuer) -> Settings:
    auth = svc_settings.auth.model_copy(update={"oidc_issuer": oidc_issuer[0]})
    return svc_settings.model_copy(update={"auth": auth})


@pytest.fixture(scope="module")
def admin(settings_oidc, admin_headers) -> Iterator[TestClient]:
    with TestClient(create_app(settings_oidc), headers=admin_headers) as c:
        assert c.post("/v1/sites", json={"id": SITE}).status_code == 201
        yield c


@pytest.fixture(scope="module")
def served(settings_oidc) -> Iterator[str]:
    """The same ingest app over real HTTP (uvicorn in a thread), for the command line."""
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings_oidc), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def _user(admin: TestClient, name: str) -> None:
    r = admin.post("/v1/users", json={"id": name, "role": "annotator", "sites": [SITE]})
    assert r.status_code == 201, r.text


def _token(admin: TestClient, user: str, **body: object) -> dict:
    r = admin.post(f"/v1/users/{user}/tokens", json=body)
    assert r.status_code == 201, r.text
    return dict(r.json())


def _status(admin: TestClient, token: str) -> int:
    return admin.get("/v1/volumes", headers={"Authorization": f"Bearer {token}"}).status_code


def _actions(admin: TestClient, resource: str) -> list[str]:
    return [e["action"] for e in admin.get("/v1/audit", params={"resource": resource}).json()]


def test_tokens_expire_by_default_and_per_token(admin, settings_oidc):
    _user(admin, "exp-user")
    default = _token(admin, "exp-user", label="laptop")
    short = _token(admin, "exp-user", label="ci", expires_in_days=1)
    now = datetime.now(UTC)
    lifetime = timedelta(days=settings_oidc.auth.token_lifetime_days)
    assert abs(datetime.fromisoformat(default["expires_at"]) - (now + lifetime)) < timedelta(
        minutes=5
    )
    assert abs(datetime.fromisoformat(short["expires_at"]) - (now + timedelta(days=1))) < (
        timedelta(minutes=5)
    )
    assert _status(admin, short["token"]) == 200
    with session_scope(settings_oidc.database_url) as s:  # a day later
        row = s.get(ApiToken, short["sha256"])
        assert row is not None
        row.expires_at = now - timedelta(seconds=1)
    r = admin.get("/v1/volumes", headers={"Authorization": f"Bearer {short['token']}"})
    assert r.status_code == 401 and r.json()["code"] == "bad_token"
    assert _status(admin, default["token"]) == 200
    listed = {t["sha256"]: t for t in admin.get("/v1/tokens", params={"user": "exp-user"}).json()}
    assert set(listed) == {default["sha256"], short["sha256"]}
    assert listed[short["sha256"]]["usable"] is False and listed[default["sha256"]]["usable"]
    assert "token" not in listed[short["sha256"]]  # never shown again
    assert _actions(admin, "exp-user").count("token.create") == 2


def test_a_lifetime_out_of_range_is_refused(admin):
    _user(admin, "range-user")
    for days in (0, -1, 100_000):
        r = admin.post("/v1/users/range-user/tokens", json={"expires_in_days": days})
        assert r.status_code == 422, r.text


def test_a_disabled_user_is_refused_everywhere_and_keeps_everything(
    admin, settings_oidc, oidc_issuer
):
    _user(admin, "dis-user")
    token = _token(admin, "dis-user")["token"]
    issuer, key = oidc_issuer
    claims = {
        "iss": issuer,
        "aud": "ctloop",
        "exp": int(time.time()) + 300,
        "sub": "oidc-dis",
        "preferred_username": "dora",
        "resource_access": {"ctloop": {"roles": ["annotator"]}},
        "ctloop_sites": [SITE],
    }
    jwt_token = jwt.encode(claims, key, "RS256", headers={"kid": "k1"})
    assert _status(admin, token) == 200
    assert _status(admin, jwt_token) == 200  # first sign-in: the user oidc-dis exists now
    for user in ("dis-user", "oidc-dis"):
        r = admin.post(f"/v1/users/{user}/disable")
        assert r.status_code == 200 and r.json()["disabled_at"], r.text
    assert _status(admin, token) == 401 and _status(admin, jwt_token) == 401
    assert admin.post("/v1/users/admin/disable").status_code == 409  # not yourself
    # Nothing deleted: the token is still listed, still not revoked, usable once enabled.
    (listed,) = admin.get("/v1/tokens", params={"user": "dis-user"}).json()
    assert listed["revoked_at"] is None
    assert admin.post("/v1/users/dis-user/enable").json()["disabled_at"] is None
    assert _status(admin, token) == 200 and _status(admin, jwt_token) == 401
    assert _actions(admin, "dis-user")[:2] == ["user.enable", "user.disable"]
    assert "user.disable" in _actions(admin, "oidc-dis")


def test_revoke_through_the_command_line(admin, served, admin_headers, capsys):
    _user(admin, "cli-user")
    api = ["admin", "--api", served, "--token", admin_headers["Authorization"].split()[1]]
    assert ctloop([*api, "token", "issue", "cli-user", "--label", "cli", "--expires-in", "7"]) == 0
    issued = json.loads(capsys.readouterr().out)
    assert _status(admin, issued["token"]) == 200
    assert ctloop([*api, "token", "list", "--user", "cli-user"]) == 0
    (listed,) = json.loads(capsys.readouterr().out)
    assert listed["sha256"] == issued["sha256"] and listed["label"] == "cli"
    assert ctloop([*api, "token", "revoke", issued["sha256"]]) == 0
    assert _status(admin, issued["token"]) == 401
    assert ctloop([*api, "user", "disable", "cli-user"]) == 0
    assert json.loads(capsys.readouterr().out)["disabled_at"]
    assert ctloop([*api, "user", "enable", "cli-user"]) == 0
    assert "token.revoke" in _actions(admin, issued["sha256"][:12])
    assert ctloop([*api, "token", "revoke", issued["sha256"]]) == 1  # already revoked


def test_audit_verify_through_the_api_and_the_command_line(
    admin, served, admin_headers, settings_oidc, capsys
):
    api = ["admin", "--api", served, "--token", admin_headers["Authorization"].split()[1]]
    _user(admin, "audit-user")
    first = admin.get("/v1/audit/verify").json()
    assert first["ok"] and first["problem"] is None and first["head_id"]
    assert (
        ctloop([*api, "audit", "verify", "--anchor", f"{first['head_id']}:{first['head_hash']}"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["ok"]
    with session_scope(settings_oidc.database_url) as s:
        row = s.scalars(
            select(AuditEntry).where(AuditEntry.action == "user.create").order_by(AuditEntry.id)
        ).first()
        assert row is not None
        s.execute(text("UPDATE audit_log SET actor = 'someone-else' WHERE id = :i"), {"i": row.id})
    assert ctloop([*api, "audit", "verify"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["problem"] == {
        "id": row.id,
        "kind": "edited",
        "message": report["problem"]["message"],
    }
    bad = admin.get("/v1/audit/verify", params={"anchor": "nonsense"})
    assert bad.status_code == 422 and bad.json()["code"] == "bad_anchor"
    annotator = _token(admin, "audit-user")["token"]
    r = admin.get("/v1/audit/verify", headers={"Authorization": f"Bearer {annotator}"})
    assert r.status_code == 403


def test_the_token_list_is_paged_and_the_command_line_reads_every_page(
    admin, served, admin_headers, capsys
):
    """Lists paginate with limits (finding 9): /v1/tokens too, newest first, page by page with
    no token twice or left out; ``ctloop admin token list`` follows the pages."""
    _user(admin, "page-user")
    issued = [_token(admin, "page-user", label=f"t{i}")["sha256"] for i in range(5)]
    seen, cursor, pages = [], None, 0
    while True:
        params = {"user": "page-user", "limit": 2, **({"cursor": cursor} if cursor else {})}
        r = admin.get("/v1/tokens", params=params)
        assert r.status_code == 200 and len(r.json()) <= 2
        seen += [t["sha256"] for t in r.json()]
        pages += 1
        cursor = r.headers.get("X-Next-Cursor")
        if not cursor:
            break
    assert pages == 3 and sorted(seen) == sorted(issued) and len(set(seen)) == 5
    created = [
        t["created_at"] for t in admin.get("/v1/tokens", params={"user": "page-user"}).json()
    ]
    assert created == sorted(created, reverse=True)
    bad = admin.get("/v1/tokens", params={"cursor": "bm90LWEtY3Vyc29y"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_request"
    api = ["admin", "--api", served, "--token", admin_headers["Authorization"].split()[1]]
    assert ctloop([*api, "token", "list", "--user", "page-user"]) == 0
    assert sorted(t["sha256"] for t in json.loads(capsys.readouterr().out)) == sorted(issued)

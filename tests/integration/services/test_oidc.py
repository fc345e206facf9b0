"""OIDC against a real Keycloak (issue 18, finding 5): roles come from the ctloop client, not
from realm-wide role names; a user is their ``sub`` (a rename keeps their id, the name is kept
apart); signing keys the issuer rotates out stop working once ingest fetches the keys again, and
new ones work, without restarting ingest."""

from __future__ import annotations

import time

import pytest
from fastapi.testclient import TestClient

from ctloop.db import User as UserRow
from ctloop.db import session_scope
from ctloop.settings import Settings
from services.ingest.app import create_app
from tests.helpers.keycloak import Keycloak, User, run_keycloak

KEYCLOAK_PORT = 28975
SITE = "kc-oidc-site"
ANNOTATOR = User("anna", "anna-pw", "annotator", (SITE,))
ADMIN = User("root", "root-pw", "admin", ())
# Keycloak realm admins (the realm's own "admin" role) who are not ctloop admins.
REALM_ADMIN = User("realmboss", "realmboss-pw", "annotator", (SITE,), realm_roles=("admin",))
REALM_ONLY = User("realmonly", "realmonly-pw", "", (SITE,), realm_roles=("admin", "reviewer"))
RENAMED = User("bob", "bob-pw", "annotator", (SITE,))
ROTATION_WAIT_S = 60.0


@pytest.fixture(scope="module")
def keycloak(tmp_path_factory):
    log = tmp_path_factory.mktemp("keycloak") / "keycloak.log"
    users = [ANNOTATOR, ADMIN, REALM_ADMIN, REALM_ONLY, RENAMED]
    with run_keycloak(KEYCLOAK_PORT, users, log, "http://127.0.0.1:9") as kc:
        yield kc


def _settings(svc_settings: Settings, kc: Keycloak, **auth: object) -> Settings:
    cfg = svc_settings.auth.model_copy(update={"oidc_issuer": kc.issuer, **auth})
    return svc_settings.model_copy(update={"auth": cfg})


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_realm_roles_do_not_make_a_ctloop_role(svc_settings, keycloak):
    with TestClient(create_app(_settings(svc_settings, keycloak))) as c:
        root = _bearer(keycloak.access_token(ADMIN))
        assert c.get("/v1/audit", headers=root).status_code == 200
        # A Keycloak realm admin with the ctloop annotator role is an annotator here.
        boss = _bearer(keycloak.access_token(REALM_ADMIN))
        assert c.get("/v1/volumes", headers=boss).status_code == 200
        r = c.get("/v1/audit", headers=boss)
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
        # Realm roles only (admin, reviewer), no role of the ctloop client: no access at all.
        r = c.get("/v1/volumes", headers=_bearer(keycloak.access_token(REALM_ONLY)))
        assert r.status_code == 401 and r.json()["code"] == "bad_token"


def test_a_user_is_their_sub_and_keeps_their_id_when_renamed(svc_settings, keycloak):
    sub = keycloak.user_id(RENAMED.name)
    with TestClient(create_app(_settings(svc_settings, keycloak))) as c:
        before = c.get("/v1/workbench/tasks", headers=_bearer(keycloak.access_token(RENAMED)))
        assert before.status_code == 200, before.text
        assert before.json()["user"] == sub
        with session_scope(svc_settings.database_url) as s:
            row = s.get(UserRow, sub)
            assert row is not None and row.display_name == "bob" and row.role == "annotator"
        keycloak.rename("bob", "robert")
        renamed = User("robert", RENAMED.password, RENAMED.role, RENAMED.sites)
        after = c.get("/v1/workbench/tasks", headers=_bearer(keycloak.access_token(renamed)))
        assert after.status_code == 200, after.text
        assert after.json()["user"] == sub
    with session_scope(svc_settings.database_url) as s:
        row = s.get(UserRow, sub)
        assert row is not None and row.display_name == "robert"
        assert s.get(UserRow, "bob") is None and s.get(UserRow, "robert") is None


def _status_until(c: TestClient, headers: dict[str, str], status: int) -> int:
    """The answer to /v1/volumes once it is ``status``, or the last one after the wait."""
    deadline = time.monotonic() + ROTATION_WAIT_S
    while True:
        got = c.get("/v1/volumes", headers=headers).status_code
        if got == status or time.monotonic() > deadline:
            return got
        time.sleep(0.5)


def test_rotated_keys_old_tokens_fail_and_new_ones_work_without_a_restart(svc_settings, keycloak):
    # Two ingest apps: one learns of the rotation from a token with a new key id (a refresh
    # on an unknown kid), the other from its keys' TTL alone.
    on_kid = _settings(svc_settings, keycloak, jwks_refresh_cooldown_s=1.0)
    on_ttl = _settings(svc_settings, keycloak, jwks_ttl_s=3.0)
    old = _bearer(keycloak.access_token(ANNOTATOR))
    with (
        TestClient(create_app(on_kid)) as by_kid,
        TestClient(create_app(on_ttl)) as by_ttl,
    ):
        assert by_kid.get("/v1/volumes", headers=old).status_code == 200
        assert by_ttl.get("/v1/volumes", headers=old).status_code == 200
        keycloak.rotate_signing_key()
        new = _bearer(keycloak.access_token(ANNOTATOR))
        assert new != old
        time.sleep(1.5)  # past the unknown-kid cooldown (1 s) of the first fetch
        assert by_kid.get("/v1/volumes", headers=new).status_code == 200
        assert by_kid.get("/v1/volumes", headers=old).status_code == 401  # gone with the fetch
        assert _status_until(by_ttl, old, 401) == 401  # refused once the TTL fetched again
        assert by_ttl.get("/v1/volumes", headers=new).status_code == 200

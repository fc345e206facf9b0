"""OIDC verification against a JWKS server whose keys change (issue 18, finding 5), without a
database: a key the issuer removed stops working at the next fetch (TTL, or a token with a key
id not seen yet), forged key ids cannot make ingest hammer the issuer, and only the ctloop
client's roles count."""

from __future__ import annotations

import time
from typing import Any

from ctloop.auth import OidcVerifier
from ctloop.settings import AuthSettings
from tests.helpers.oidc import JwksServer, jwks_server, new_key

ROLE = {"resource_access": {"ctloop": {"roles": ["annotator"]}}}
# The key tests read realm roles (a setting both old and new code have), so that on the old code
# they fail for the key handling alone.
REALM_ROLE = {"realm_access": {"roles": ["annotator"]}}


def _verifier(server: JwksServer, **cfg: Any) -> OidcVerifier:
    return OidcVerifier(AuthSettings(oidc_issuer=server.issuer, **cfg))


def _key_verifier(server: JwksServer, **cfg: Any) -> OidcVerifier:
    return _verifier(server, roles_claim="realm_access.roles", **cfg)


def _until_refused(verifier: OidcVerifier, token: str, wait_s: float = 30.0) -> bool:
    deadline = time.monotonic() + wait_s
    while verifier.principal(token) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_removed_key_stops_working_when_the_keys_expire() -> None:
    with jwks_server({"k1": new_key()}) as server:
        verifier = _key_verifier(server, jwks_ttl_s=1.0)
        old = server.token("k1", sub="u1", **REALM_ROLE)
        assert verifier.principal(old) is not None
        server.publish({"k2": new_key()})
        assert _until_refused(verifier, old)
        assert verifier.principal(server.token("k2", sub="u1", **REALM_ROLE)) is not None


def test_a_new_key_id_fetches_the_keys_and_drops_the_removed_one() -> None:
    with jwks_server({"k1": new_key()}) as server:
        verifier = _key_verifier(server, jwks_refresh_cooldown_s=1.0)
        old = server.token("k1", sub="u1", **REALM_ROLE)
        assert verifier.principal(old) is not None
        server.publish({"k2": new_key()})
        time.sleep(1.2)  # past the cooldown that the first fetch started
        new = server.token("k2", sub="u1", **REALM_ROLE)
        who = verifier.principal(new)
        assert who is not None and who.user_id == "u1" and who.role == "annotator"
        assert verifier.principal(old) is None  # long before the 300 s TTL


def test_unknown_key_ids_fetch_at_most_once_per_cooldown() -> None:
    with jwks_server({"k1": new_key()}) as server:
        verifier = _key_verifier(server, jwks_refresh_cooldown_s=60.0)
        assert verifier.principal(server.token("k1", sub="u1", **REALM_ROLE)) is not None
        before = server.fetches
        for i in range(20):
            server.publish({"k1": server.signers["k1"], f"x{i}": new_key()})
            assert verifier.principal(server.token(f"x{i}", sub="u1", **REALM_ROLE)) is None
        assert server.fetches - before == 0  # all within the cooldown of the first fetch


def test_only_the_ctloop_clients_roles_count() -> None:
    with jwks_server({"k1": new_key()}) as server:
        verifier = _verifier(server)
        realm_admin = server.token(
            "k1", sub="u1", realm_access={"roles": ["admin"]}, **ROLE, preferred_username="jo"
        )
        who = verifier.principal(realm_admin)
        assert who is not None and who.role == "annotator" and not who.is_admin
        assert who.user_id == "u1" and who.name == "jo"  # the id is sub, the name apart
        assert (
            verifier.principal(server.token("k1", sub="u2", realm_access={"roles": ["admin"]}))
            is None
        )
        other_client = {"resource_access": {"account": {"roles": ["admin"]}}}
        assert verifier.principal(server.token("k1", sub="u3", **other_client)) is None
        # A deployment that wants realm roles says so.
        realm = _verifier(server, roles_claim="realm_access.roles")
        boss = realm.principal(realm_admin)
        assert boss is not None and boss.is_admin

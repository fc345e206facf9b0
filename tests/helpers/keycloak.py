"""A real Keycloak (the Quarkus distribution ``make setup`` unpacks into ``.ctloop/tools``) for
the tests that sign in over OIDC, as annotators at a hospital would.

It runs with an in-memory database (plain HTTP on 127.0.0.1) and imports one realm at start:
``ctloop`` with the workbench's public client (authorization code + PKCE, or the password grant
for API tests), the ``ctloop`` client whose roles are the users' ctloop roles (tokens carry them
in ``resource_access.ctloop.roles``), realm roles (which ctloop ignores), sites as groups (a
``ctloop_sites`` claim of group names) and one user per entry of ``users``. Tokens carry
``aud: ctloop`` like ingest expects. A master-realm admin (``ADMIN``) lets tests change the
realm while it runs: rename a user, rotate the signing keys.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from ctloop.auth import ROLES
from ctloop.settings import REPO_ROOT

HOME = REPO_ROOT / ".ctloop" / "tools" / "keycloak"
REALM = "ctloop"
CLIENT_ID = "ctloop-workbench"
API_CLIENT_ID = "ctloop"  # the client whose roles are ctloop roles (auth.oidc_audience)
ADMIN = ("kc-admin", "kc-admin-pw")  # Keycloak's own bootstrap admin (master realm)
START_TIMEOUT_S = 600.0  # a loaded test machine has taken over 4 minutes
# ``make setup`` builds the server once for an in-memory database (``kc.sh build``), so a start
# skips Quarkus' augmentation; plain HTTP on 127.0.0.1 only, as a test provider.
START_ARGS = (
    "start",
    "--optimized",
    "--http-enabled=true",
    "--hostname-strict=false",
    "--import-realm",
)


@dataclass(frozen=True)
class User:
    name: str
    password: str
    role: str  # the user's role of the ctloop client; "" for none
    sites: tuple[str, ...]
    realm_roles: tuple[str, ...] = ()  # realm-wide roles (ctloop must not read these)


@dataclass(frozen=True)
class Keycloak:
    url: str
    issuer: str
    client_id: str

    def password_token(self, user: User) -> dict:
        """Tokens for ``user`` through the password grant (API tests; the page uses PKCE)."""
        r = httpx.post(
            f"{self.issuer}/protocol/openid-connect/token",
            data={
                "grant_type": "password",
                "client_id": self.client_id,
                "username": user.name,
                "password": user.password,
                "scope": "openid",
            },
            timeout=30,
        )
        r.raise_for_status()
        return dict(r.json())

    def access_token(self, user: User) -> str:
        return str(self.password_token(user)["access_token"])

    def admin(self) -> httpx.Client:
        """A client of the realm's admin REST API, signed in as Keycloak's bootstrap admin."""
        r = httpx.post(
            f"{self.url}/realms/master/protocol/openid-connect/token",
            data={
                "grant_type": "password",
                "client_id": "admin-cli",
                "username": ADMIN[0],
                "password": ADMIN[1],
            },
            timeout=30,
        )
        r.raise_for_status()
        return httpx.Client(
            base_url=f"{self.url}/admin/realms/{REALM}",
            headers={"Authorization": f"Bearer {r.json()['access_token']}"},
            timeout=30,
        )

    def user_id(self, name: str) -> str:
        """The user's id in Keycloak: the ``sub`` of their tokens."""
        with self.admin() as kc:
            (found,) = kc.get("/users", params={"username": name, "exact": "true"}).json()
        return str(found["id"])

    def rename(self, name: str, new_name: str) -> None:
        uid = self.user_id(name)
        with self.admin() as kc:
            kc.put(f"/users/{uid}", json={"username": new_name}).raise_for_status()

    def rotate_signing_key(self) -> None:
        """A new RSA signing key provider (higher priority: new tokens use it), then every
        older RSA signing provider deleted: the issuer's JWKS no longer has the old key."""
        with self.admin() as kc:
            realm_id = kc.get("").json()["id"]
            providers = kc.get("/components", params={"type": KEY_PROVIDER}).json()
            old = [p["id"] for p in providers if p["providerId"] == "rsa-generated"]
            kc.post(
                "/components",
                json={
                    "name": f"rsa-rotated-{len(old)}",
                    "providerId": "rsa-generated",
                    "providerType": KEY_PROVIDER,
                    "parentId": realm_id,
                    "config": {"priority": ["1000"], "keySize": ["2048"], "algorithm": ["RS256"]},
                },
            ).raise_for_status()
            for ident in old:
                kc.delete(f"/components/{ident}").raise_for_status()


KEY_PROVIDER = "org.keycloak.keys.KeyProvider"


def _user(u: User) -> dict:
    return {
        "username": u.name,
        "enabled": True,
        "email": f"{u.name}@example.org",
        "emailVerified": True,
        "firstName": u.name.title(),
        "lastName": "Annotator",
        "credentials": [{"type": "password", "value": u.password, "temporary": False}],
        "realmRoles": list(u.realm_roles),
        "clientRoles": {API_CLIENT_ID: [u.role]} if u.role else {},
        "groups": [f"/{s}" for s in u.sites],
    }


def realm(users: list[User], access_token_s: int, app_origin: str) -> dict:
    sites = sorted({s for u in users for s in u.sites})
    return {
        "realm": REALM,
        "enabled": True,
        "sslRequired": "none",
        "accessTokenLifespan": access_token_s,
        "editUsernameAllowed": True,  # admins rename users (ctloop keys them by sub)
        "roles": {
            "realm": [{"name": r} for r in ROLES],
            "client": {API_CLIENT_ID: [{"name": r} for r in ROLES]},
        },
        "groups": [{"name": s, "path": f"/{s}"} for s in sites],
        "clients": [
            {"clientId": API_CLIENT_ID, "bearerOnly": True, "publicClient": False},
            {
                "clientId": CLIENT_ID,
                "publicClient": True,
                "standardFlowEnabled": True,
                "directAccessGrantsEnabled": True,
                "redirectUris": [f"{app_origin}/ui/*"],
                "webOrigins": [app_origin],
                "attributes": {"pkce.code.challenge.method": "S256"},
                "protocolMappers": [
                    {
                        "name": "audience",
                        "protocol": "openid-connect",
                        "protocolMapper": "oidc-audience-mapper",
                        "config": {
                            "included.custom.audience": "ctloop",
                            "access.token.claim": "true",
                        },
                    },
                    {
                        "name": "sites",
                        "protocol": "openid-connect",
                        "protocolMapper": "oidc-group-membership-mapper",
                        "config": {
                            "claim.name": "ctloop_sites",
                            "full.path": "false",
                            "access.token.claim": "true",
                            "id.token.claim": "false",
                            "userinfo.token.claim": "false",
                        },
                    },
                ],
            },
        ],
        "users": [_user(u) for u in users],
    }


@contextmanager
def run_keycloak(
    port: int, users: list[User], log: Path, app_origin: str, access_token_s: int = 300
) -> Iterator[Keycloak]:
    """Keycloak on ``127.0.0.1:port`` with the realm above, for the workbench served at
    ``app_origin`` (its redirect URI and CORS origin); stopped (and forgotten) on exit."""
    if not (HOME / "bin" / "kc.sh").exists():
        raise RuntimeError(f"Keycloak is not installed in {HOME}: run `make setup`")
    imports = HOME / "data" / "import"
    imports.mkdir(parents=True, exist_ok=True)
    spec = realm(users, access_token_s, app_origin)
    (imports / f"{REALM}-realm.json").write_text(json.dumps(spec))
    env = {
        **os.environ,
        "JAVA_OPTS_KC_HEAP": "-Xms64m -Xmx512m",
        "KC_DB": "dev-mem",
        "KC_HTTP_HOST": "127.0.0.1",
        "KC_HOSTNAME_STRICT": "false",
        "KC_BOOTSTRAP_ADMIN_USERNAME": ADMIN[0],
        "KC_BOOTSTRAP_ADMIN_PASSWORD": ADMIN[1],
    }
    url = f"http://127.0.0.1:{port}"
    issuer = f"{url}/realms/{REALM}"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(HOME / "bin" / "kc.sh"), *START_ARGS, f"--http-port={port}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = log.read_text()[-3000:]
                raise RuntimeError(f"Keycloak exited ({proc.returncode}):\n{tail}")
            try:
                if httpx.get(f"{issuer}/.well-known/openid-configuration", timeout=5).is_success:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Keycloak did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1.0)
        yield Keycloak(url=url, issuer=issuer, client_id=CLIENT_ID)
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()

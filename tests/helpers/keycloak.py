"""A real Keycloak (the Quarkus distribution ``make setup`` unpacks into ``.ctloop/tools``) for
the tests that sign in over OIDC, as annotators at a hospital would.

It runs with an in-memory database (plain HTTP on 127.0.0.1) and imports one realm at start:
``ctloop`` with the workbench's public client (authorization code + PKCE, or the password grant
for API tests), realm roles, sites as groups (a ``ctloop_sites`` claim of group names) and one
user per entry of ``users``. Tokens carry ``aud: ctloop`` like ingest expects.
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

from ctloop.settings import REPO_ROOT

HOME = REPO_ROOT / ".ctloop" / "tools" / "keycloak"
REALM = "ctloop"
CLIENT_ID = "ctloop-workbench"
START_TIMEOUT_S = 240.0
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
    role: str
    sites: tuple[str, ...]


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


def realm(users: list[User], access_token_s: int, app_origin: str) -> dict:
    sites = sorted({s for u in users for s in u.sites})
    return {
        "realm": REALM,
        "enabled": True,
        "sslRequired": "none",
        "accessTokenLifespan": access_token_s,
        "roles": {"realm": [{"name": r} for r in ("annotator", "reviewer", "integration")]},
        "groups": [{"name": s, "path": f"/{s}"} for s in sites],
        "clients": [
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
            }
        ],
        "users": [
            {
                "username": u.name,
                "enabled": True,
                "email": f"{u.name}@example.org",
                "emailVerified": True,
                "firstName": u.name.title(),
                "lastName": "Annotator",
                "credentials": [{"type": "password", "value": u.password, "temporary": False}],
                "realmRoles": [u.role],
                "groups": [f"/{s}" for s in u.sites],
            }
            for u in users
        ],
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

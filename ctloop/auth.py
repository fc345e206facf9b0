"""Identity for the embedded default: users with one role, their sites, static API tokens.

Tokens are random, shown once, stored only as SHA-256. On first start the ingest service creates
an admin and writes its token to ``<run_dir>/admin-token`` (mode 0600).
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import jwt
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from ctloop.db import ApiToken, SiteMembership, User, session_scope
from ctloop.settings import AuthSettings

Role = Literal["admin", "reviewer", "annotator", "integration"]
ROLES: tuple[str, ...] = ("admin", "reviewer", "annotator", "integration")
TOKEN_PREFIX = "ctl_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, their role and the sites they may see."""

    user_id: str
    role: str
    sites: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_see(self, site_id: str) -> bool:
        return self.is_admin or site_id in self.sites


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A random API token (shown once; only its SHA-256 is kept)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def issue_token(database_url: str, user_id: str, label: str = "") -> str:
    token = new_token()
    with session_scope(database_url) as s:
        s.add(ApiToken(sha256=token_hash(token), user_id=user_id, label=label))
    return token


def principal_for(database_url: str, token: str) -> Principal | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    with session_scope(database_url) as s:
        row = s.get(ApiToken, token_hash(token))
        if row is None or row.revoked_at is not None:
            return None
        user = s.get(User, row.user_id)
        if user is None:
            return None
        sites = s.scalars(
            select(SiteMembership.site_id).where(SiteMembership.user_id == user.id)
        ).all()
        return Principal(user_id=user.id, role=user.role, sites=frozenset(sites))


class OidcVerifier:
    """Verifies OIDC access tokens (signature from the issuer's JWKS, issuer, audience, expiry)
    and maps their claims onto a :class:`Principal`."""

    def __init__(self, cfg: AuthSettings) -> None:
        if not cfg.oidc_issuer or not cfg.jwks_url:
            raise ValueError("OIDC needs an issuer")
        self.cfg = cfg
        self.jwks = jwt.PyJWKClient(cfg.jwks_url, cache_keys=True, lifespan=300)

    def principal(self, token: str) -> Principal | None:
        try:
            key = self.jwks.get_signing_key_from_jwt(token)
            claims = jwt.decode(
                token,
                key.key,
                algorithms=["RS256", "RS384", "RS512", "ES256", "ES384"],
                audience=self.cfg.oidc_audience,
                issuer=self.cfg.oidc_issuer,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.PyJWTError:
            return None
        user = claims.get(self.cfg.username_claim) or claims.get("sub")
        roles = _claim(claims, self.cfg.roles_claim)
        role = next((r for r in ROLES if isinstance(roles, list) and r in roles), None)
        sites = _claim(claims, self.cfg.sites_claim) or []
        if not user or role is None or not isinstance(sites, list):
            return None
        return Principal(user_id=str(user), role=role, sites=frozenset(str(x) for x in sites))


def _claim(claims: dict[str, Any], path: str) -> Any:
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def revoke_token(database_url: str, token_sha256: str) -> bool:
    with session_scope(database_url) as s:
        row = s.get(ApiToken, token_sha256)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = datetime.now(UTC)
        return True


def ensure_admin_token(database_url: str, path: Path, given: str | None = None) -> str | None:
    """Create the first admin unless an admin exists, with the deployment's ``given`` token
    (kept in a Secret) or a new one, and write the token to ``path`` (0600).

    Returns the token, or None when nothing was created (an admin exists, or another replica
    created it at the same moment).
    """
    if given is not None and not given.startswith(TOKEN_PREFIX):
        raise ValueError(f"the bootstrap admin token must start with {TOKEN_PREFIX!r}")
    token = given or new_token()
    try:
        with session_scope(database_url) as s:
            if s.scalar(select(User.id).where(User.role == "admin").limit(1)) is not None:
                return None
            s.add(User(id="admin", role="admin"))
            s.flush()
            s.add(ApiToken(sha256=token_hash(token), user_id="admin", label="bootstrap"))
    except IntegrityError:  # another replica made the admin first
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token

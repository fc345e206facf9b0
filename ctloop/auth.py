"""Identity: users with one role and their sites, static API tokens, and OIDC access tokens.

Tokens are random, shown once, stored only as SHA-256, and expire (``auth.token_lifetime_days``
unless the admin gives another lifetime). A disabled user's tokens and OIDC tokens are refused;
nothing of theirs is deleted. On first start the ingest service creates an admin and writes its
token to ``<run_dir>/admin-token`` (mode 0600); that token expires like any other (see
:func:`ensure_admin_token`).

OIDC users are keyed by the token's ``sub`` (stable at the issuer) and created on first sight;
their role comes from the ctloop client's roles unless ``auth.roles_claim`` says otherwise.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import jwt
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError

from ctloop.db import ApiToken, SiteMembership, User, session_scope
from ctloop.settings import AuthSettings, get_settings

Role = Literal["admin", "reviewer", "annotator", "integration"]
ROLES: tuple[str, ...] = ("admin", "reviewer", "annotator", "integration")
TOKEN_PREFIX = "ctl_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user, their role and the sites they may see."""

    user_id: str
    role: str
    sites: frozenset[str]
    name: str = ""  # shown to people (an OIDC user's display name); the id is what rows keep

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


def _lifetime(lifetime: timedelta | None) -> timedelta:
    """``lifetime``, else the deployment's default (``CTLOOP_AUTH__TOKEN_LIFETIME_DAYS``)."""
    return (
        lifetime
        if lifetime is not None
        else timedelta(days=get_settings().auth.token_lifetime_days)
    )


def issue_token(
    database_url: str, user_id: str, label: str = "", lifetime: timedelta | None = None
) -> str:
    """A new token of ``user_id``, valid for ``lifetime`` (default: the settings' default
    lifetime, ``auth.token_lifetime_days``)."""
    token = new_token()
    expires = datetime.now(UTC) + _lifetime(lifetime)
    with session_scope(database_url) as s:
        s.add(ApiToken(sha256=token_hash(token), user_id=user_id, label=label, expires_at=expires))
    return token


def token_usable(row: ApiToken, now: datetime) -> bool:
    """Not revoked and not expired (tokens made before expiry existed have none)."""
    return row.revoked_at is None and (row.expires_at is None or row.expires_at > now)


def principal_for(database_url: str, token: str) -> Principal | None:
    """The user a static API token stands for; None when it is unknown, revoked or expired, or
    its user is disabled."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    with session_scope(database_url) as s:
        row = s.get(ApiToken, token_hash(token))
        if row is None or not token_usable(row, datetime.now(UTC)):
            return None
        user = s.get(User, row.user_id)
        if user is None or user.disabled_at is not None:
            return None
        sites = s.scalars(
            select(SiteMembership.site_id).where(SiteMembership.user_id == user.id)
        ).all()
        return Principal(
            user_id=user.id,
            role=user.role,
            sites=frozenset(sites),
            name=user.display_name or user.id,
        )


class OidcVerifier:
    """Verifies OIDC access tokens (signature from the issuer's JWKS, issuer, audience, expiry)
    and maps their claims onto a :class:`Principal`: the id is ``sub``, the role the first of
    :data:`ROLES` found at ``cfg.roles_path``, the sites from ``cfg.sites_claim``.

    The JWKS is fetched again after ``cfg.jwks_ttl_s`` and when a token names a key not seen yet
    (at most once per ``cfg.jwks_refresh_cooldown_s``); no key is kept beyond the set the issuer
    last published, so a removed key stops working at the next fetch. With ``database_url``
    each user is recorded (users row keyed by ``sub``, its display name kept up to date) and a
    disabled user is refused.
    """

    ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384")

    def __init__(self, cfg: AuthSettings, database_url: str | None = None) -> None:
        if not cfg.oidc_issuer or not cfg.jwks_url:
            raise ValueError("OIDC needs an issuer")
        self.cfg = cfg
        self.db = database_url
        self.jwks = jwt.PyJWKClient(
            cfg.jwks_url,
            cache_keys=False,  # PyJWT's per-kid cache never expires: a removed key would live on
            lifespan=cfg.jwks_ttl_s,
            cooldown_duration=cfg.jwks_refresh_cooldown_s,
        )

    def claims(self, token: str) -> dict[str, Any] | None:
        """The verified claims of ``token``; None if it is not valid now."""
        try:
            key = self.jwks.get_signing_key_from_jwt(token)
            return dict(
                jwt.decode(
                    token,
                    key.key,
                    algorithms=list(self.ALGORITHMS),
                    audience=self.cfg.oidc_audience,
                    issuer=self.cfg.oidc_issuer,
                    options={"require": ["exp", "iss", "aud", "sub"]},
                )
            )
        except jwt.PyJWTError:
            return None

    def principal(self, token: str) -> Principal | None:
        claims = self.claims(token)
        if claims is None:
            return None
        user = str(claims.get("sub") or "")
        roles = _claim(claims, self.cfg.roles_path)
        role = next((r for r in ROLES if isinstance(roles, list) and r in roles), None)
        sites = _claim(claims, tuple(self.cfg.sites_claim.split("."))) or []
        if not user or role is None or not isinstance(sites, list):
            return None
        name = str(claims.get(self.cfg.username_claim) or claims.get("name") or user)
        if self.db is not None and not record_oidc_user(self.db, user, role, name):
            return None
        return Principal(user_id=user, role=role, sites=frozenset(str(x) for x in sites), name=name)


def _claim(claims: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = claims
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def record_oidc_user(database_url: str, user_id: str, role: str, name: str) -> bool:
    """Keep the users row of an OIDC user (keyed by ``sub``) in step with their token: made on
    first sight, its display name and role updated when they change. False: the user is
    disabled."""
    name = name[:200]
    for _ in range(2):  # a concurrent first request may insert the row between our two looks
        try:
            with session_scope(database_url) as s:
                row = s.get(User, user_id)
                if row is None:
                    s.add(User(id=user_id, role=role, display_name=name))
                    return True
                if row.disabled_at is not None:
                    return False
                if (row.display_name, row.role) != (name, role):
                    row.display_name, row.role = name, role
                return True
        except IntegrityError:
            continue
    return True


def revoke_token(database_url: str, token_sha256: str) -> bool:
    with session_scope(database_url) as s:
        row = s.get(ApiToken, token_sha256)
        if row is None or row.revoked_at is not None:
            return False
        row.revoked_at = datetime.now(UTC)
        return True


def list_tokens(
    database_url: str,
    user_id: str | None = None,
    limit: int | None = None,
    after: tuple[datetime, str] | None = None,
) -> list[ApiToken]:
    """The tokens (of ``user_id``), newest first: revoked and expired ones too, for the
    record; at most ``limit``, those after the (created_at, sha256) key ``after``. Rows only,
    never a token: those are shown once, at issue."""
    with session_scope(database_url) as s:
        q = select(ApiToken).order_by(ApiToken.created_at.desc(), ApiToken.sha256)
        if user_id is not None:
            q = q.where(ApiToken.user_id == user_id)
        if after is not None:
            at, sha = after
            q = q.where(
                or_(
                    ApiToken.created_at < at, and_(ApiToken.created_at == at, ApiToken.sha256 > sha)
                )
            )
        if limit is not None:
            q = q.limit(limit)
        return list(s.scalars(q))


def set_user_disabled(database_url: str, user_id: str, disabled: bool) -> User | None:
    """Disable a user (their tokens and OIDC tokens are refused from the next request on) or
    enable them again; nothing of theirs is deleted. None: no such user."""
    with session_scope(database_url) as s:
        user = s.get(User, user_id)
        if user is None:
            return None
        if disabled and user.disabled_at is None:
            user.disabled_at = datetime.now(UTC)
        elif not disabled:
            user.disabled_at = None
        return user


def ensure_admin_token(
    database_url: str, path: Path, given: str | None = None, lifetime: timedelta | None = None
) -> str | None:
    """Create the first admin unless an admin exists, with the deployment's ``given`` token
    (kept in a Secret) or a new one, and write the token to ``path`` (0600).

    The token expires after ``lifetime`` (default ``auth.token_lifetime_days``, 90 days), like
    any other: it exists to make the first real admins (``ctloop admin user``/``token``, or an
    OIDC admin), after which it should be revoked; a file or Secret holding it does not open
    the API forever. To keep using it past then, issue the admin a new token before it lapses.

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
            s.add(
                ApiToken(
                    sha256=token_hash(token),
                    user_id="admin",
                    label="bootstrap",
                    expires_at=datetime.now(UTC) + _lifetime(lifetime),
                )
            )
    except IntegrityError:  # another replica made the admin first
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token

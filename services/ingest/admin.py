"""Authentication (bearer API tokens) and the admin API: sites, users, tokens, audit log."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select

from ctloop.auth import (
    ROLES,
    TOKEN_PREFIX,
    OidcVerifier,
    Principal,
    issue_token,
    principal_for,
    revoke_token,
    token_hash,
)
from ctloop.db import AuditEntry, Site, SiteMembership, User, audit, session_scope
from services.ingest.validation import safe_id


def _error(status: int, code: str, message: str, **headers: str) -> HTTPException:
    return HTTPException(status, detail={"code": code, "message": message}, headers=headers or None)


class Auth:
    """FastAPI dependencies: who is calling, and may they."""

    def __init__(self, database_url: str, oidc: OidcVerifier | None = None) -> None:
        self.db = database_url
        self.oidc = oidc

    def principal(self, request: Request) -> Principal:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise _error(
                401,
                "unauthenticated",
                "send 'Authorization: Bearer <token>'",
                **{"WWW-Authenticate": "Bearer"},
            )
        who = self.verify(token)
        if who is None:
            raise _error(
                401,
                "bad_token",
                "the token is unknown or revoked",
                **{"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        return who

    def verify(self, token: str) -> Principal | None:
        """The principal a bearer token stands for (None: unknown, revoked or invalid)."""
        token = token.strip()
        if token.startswith(TOKEN_PREFIX):
            return principal_for(self.db, token)
        return self.oidc.principal(token) if self.oidc is not None else None

    def require(self, *roles: str) -> Callable[..., Principal]:
        def dependency(who: Principal = Depends(self.principal)) -> Principal:
            if who.role not in roles:
                raise _error(403, "forbidden", f"role {who.role} may not do this")
            return who

        return dependency


class SiteIn(BaseModel):
    id: str = Field(description="letters, digits, . _ -")
    name: str = ""


class SiteOut(BaseModel):
    id: str
    name: str


class UserIn(BaseModel):
    id: str
    role: str = Field(description=" | ".join(ROLES))
    sites: list[str] = Field(default_factory=list)


class UserOut(BaseModel):
    id: str
    role: str
    sites: list[str]


class TokenIn(BaseModel):
    label: str = ""


class TokenOut(BaseModel):
    token: str = Field(description="shown once; only its SHA-256 is kept")
    sha256: str
    user_id: str


class AuditOut(BaseModel):
    at: datetime
    actor: str
    action: str
    resource: str
    site_id: str | None
    detail: dict[str, Any]


def admin_router(database_url: str, auth: Auth) -> APIRouter:
    r = APIRouter(prefix="/v1", tags=["admin"])
    admin = auth.require("admin")
    db = database_url

    @r.post("/sites", status_code=201, response_model=SiteOut)
    def create_site(body: SiteIn, who: Principal = Depends(admin)) -> SiteOut:
        site = safe_id(body.id, "site id")
        with session_scope(db) as s:
            if s.get(Site, site) is not None:
                raise _error(409, "exists", f"site {site} exists")
            s.add(Site(id=site, name=body.name or site))
            audit(s, who.user_id, "site.create", site, site_id=site)
        return SiteOut(id=site, name=body.name or site)

    @r.get("/sites", response_model=list[SiteOut])
    def list_sites(who: Principal = Depends(auth.principal)) -> list[SiteOut]:
        with session_scope(db) as s:
            rows = s.scalars(select(Site).order_by(Site.id))
            return [SiteOut(id=x.id, name=x.name) for x in rows if who.may_see(x.id)]

    @r.post("/users", status_code=201, response_model=UserOut)
    def create_user(body: UserIn, who: Principal = Depends(admin)) -> UserOut:
        user = safe_id(body.id, "user id")
        if body.role not in ROLES:
            raise _error(422, "bad_role", f"role must be one of {', '.join(ROLES)}")
        sites = [safe_id(x, "site id") for x in body.sites]
        with session_scope(db) as s:
            if s.get(User, user) is not None:
                raise _error(409, "exists", f"user {user} exists")
            missing = [x for x in sites if s.get(Site, x) is None]
            if missing:
                raise _error(404, "unknown_site", f"no site {', '.join(missing)}")
            s.add(User(id=user, role=body.role))
            s.flush()
            for x in sites:
                s.add(SiteMembership(user_id=user, site_id=x))
            audit(s, who.user_id, "user.create", user, role=body.role, sites=sites)
        return UserOut(id=user, role=body.role, sites=sites)

    @r.post("/users/{user_id}/tokens", status_code=201, response_model=TokenOut)
    def create_token(user_id: str, body: TokenIn, who: Principal = Depends(admin)) -> TokenOut:
        with session_scope(db) as s:
            if s.get(User, user_id) is None:
                raise _error(404, "not_found", f"no user {user_id}")
            audit(s, who.user_id, "token.create", user_id, label=body.label)
        token = issue_token(db, user_id, body.label)
        return TokenOut(token=token, sha256=token_hash(token), user_id=user_id)

    @r.delete("/tokens/{sha256}", status_code=204)
    def revoke(sha256: str, who: Principal = Depends(admin)) -> None:
        if not revoke_token(db, sha256):
            raise _error(404, "not_found", "no such active token")
        with session_scope(db) as s:
            audit(s, who.user_id, "token.revoke", sha256[:12])

    @r.get("/audit", response_model=list[AuditOut])
    def audit_log(
        who: Principal = Depends(admin),
        resource: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
    ) -> list[AuditOut]:
        with session_scope(db) as s:
            q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            if resource:
                q = q.where(AuditEntry.resource == resource)
            return [
                AuditOut(
                    at=e.at,
                    actor=e.actor,
                    action=e.action,
                    resource=e.resource,
                    site_id=e.site_id,
                    detail=e.detail,
                )
                for e in s.scalars(q)
            ]

    return r

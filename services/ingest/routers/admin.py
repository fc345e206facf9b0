"""``/v1`` administration: sites, users, API tokens, and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from ctloop.auth import ROLES, issue_token, revoke_token, token_hash
from ctloop.db import AuditEntry, Site, SiteMembership, User, audit, session_scope
from services.ingest.deps import Admin, Context, SignedIn
from services.ingest.errors import ApiError, conflict, not_found
from services.ingest.schemas import (
    AuditOut,
    SiteIn,
    SiteOut,
    TokenIn,
    TokenOut,
    UserIn,
    UserOut,
)
from services.ingest.validation import safe_id

router = APIRouter(prefix="/v1", tags=["admin"])


@router.post("/sites", status_code=201, response_model=SiteOut)
def create_site(ctx: Context, who: Admin, body: SiteIn) -> SiteOut:
    site = safe_id(body.id, "site id")
    with session_scope(ctx.db) as s:
        if s.get(Site, site) is not None:
            raise conflict("exists", f"site {site} exists")
        s.add(Site(id=site, name=body.name or site))
        audit(s, who.user_id, "site.create", site, site_id=site)
    return SiteOut(id=site, name=body.name or site)


@router.get("/sites", response_model=list[SiteOut])
def list_sites(ctx: Context, who: SignedIn) -> list[SiteOut]:
    with session_scope(ctx.db) as s:
        rows = s.scalars(select(Site).order_by(Site.id))
        return [SiteOut(id=x.id, name=x.name) for x in rows if who.may_see(x.id)]


@router.post("/users", status_code=201, response_model=UserOut)
def create_user(ctx: Context, who: Admin, body: UserIn) -> UserOut:
    user = safe_id(body.id, "user id")
    if body.role not in ROLES:
        raise ApiError("bad_role", f"role must be one of {', '.join(ROLES)}")
    sites = [safe_id(x, "site id") for x in body.sites]
    with session_scope(ctx.db) as s:
        if s.get(User, user) is not None:
            raise conflict("exists", f"user {user} exists")
        missing = [x for x in sites if s.get(Site, x) is None]
        if missing:
            raise not_found(f"no site {', '.join(missing)}", "unknown_site")
        s.add(User(id=user, role=body.role))
        s.flush()
        for x in sites:
            s.add(SiteMembership(user_id=user, site_id=x))
        audit(s, who.user_id, "user.create", user, role=body.role, sites=sites)
    return UserOut(id=user, role=body.role, sites=sites)


@router.post("/users/{user_id}/tokens", status_code=201, response_model=TokenOut)
def create_token(ctx: Context, who: Admin, user_id: str, body: TokenIn) -> TokenOut:
    with session_scope(ctx.db) as s:
        if s.get(User, user_id) is None:
            raise not_found(f"no user {user_id}")
        audit(s, who.user_id, "token.create", user_id, label=body.label)
    token = issue_token(ctx.db, user_id, body.label)
    return TokenOut(token=token, sha256=token_hash(token), user_id=user_id)


@router.delete("/tokens/{sha256}", status_code=204)
def revoke(ctx: Context, who: Admin, sha256: str) -> None:
    if not revoke_token(ctx.db, sha256):
        raise not_found("no such active token")
    with session_scope(ctx.db) as s:
        audit(s, who.user_id, "token.revoke", sha256[:12])


@router.get("/audit", response_model=list[AuditOut])
def audit_log(
    ctx: Context,
    who: Admin,
    resource: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 500,
) -> list[AuditOut]:
    with session_scope(ctx.db) as s:
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

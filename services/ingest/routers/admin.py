"""``/v1`` administration: sites, users (disable, enable), API tokens (issue, list, revoke),
the audit log and the check of its hash chain. Every change is audited."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request, Response
from sqlalchemy import select

from ctloop.audit_chain import audit, parse_anchor, verify_chain
from ctloop.auth import (
    ROLES,
    issue_token,
    list_tokens,
    revoke_token,
    set_user_disabled,
    token_hash,
    token_usable,
)
from ctloop.db import ApiToken, AuditEntry, Site, SiteMembership, User, session_scope
from ctloop.paging import Page, one_page
from services.ingest.deps import Admin, Context, SignedIn
from services.ingest.errors import ApiError, conflict, not_found
from services.ingest.schemas import (
    AuditChainOut,
    AuditOut,
    SiteIn,
    SiteOut,
    TokenIn,
    TokenInfoOut,
    TokenOut,
    UserIn,
    UserOut,
    UserStateOut,
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
def list_sites(
    ctx: Context, who: SignedIn, page: Page, request: Request, response: Response
) -> list[SiteOut]:
    """The sites you may see, by id, a page at a time (``ctloop.paging``)."""
    with session_scope(ctx.db) as s:
        q = select(Site).order_by(Site.id).limit(page.fetch)
        if not who.is_admin:
            q = q.where(Site.id.in_(who.sites))
        if (after := page.after_key(str)) is not None:
            q = q.where(Site.id > after[0])
        rows = [SiteOut(id=x.id, name=x.name) for x in s.scalars(q)]
    return one_page(rows, page, lambda x: [x.id], request, response)


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


@router.post("/users/{user_id}/disable", response_model=UserStateOut)
def disable_user(ctx: Context, who: Admin, user_id: str) -> UserStateOut:
    """Refuse the user's tokens and OIDC tokens from the next request on; nothing is deleted."""
    if user_id == who.user_id:
        raise conflict("self", "an admin cannot disable themselves")
    return _set_disabled(ctx, who.user_id, user_id, True)


@router.post("/users/{user_id}/enable", response_model=UserStateOut)
def enable_user(ctx: Context, who: Admin, user_id: str) -> UserStateOut:
    return _set_disabled(ctx, who.user_id, user_id, False)


def _set_disabled(ctx: Context, actor: str, user_id: str, disabled: bool) -> UserStateOut:
    user = set_user_disabled(ctx.db, user_id, disabled)
    if user is None:
        raise not_found(f"no user {user_id}")
    with session_scope(ctx.db) as s:
        audit(s, actor, "user.disable" if disabled else "user.enable", user_id)
    return UserStateOut(
        id=user.id, role=user.role, display_name=user.display_name, disabled_at=user.disabled_at
    )


@router.post("/users/{user_id}/tokens", status_code=201, response_model=TokenOut)
def create_token(ctx: Context, who: Admin, user_id: str, body: TokenIn) -> TokenOut:
    days = body.expires_in_days or ctx.settings.auth.token_lifetime_days
    with session_scope(ctx.db) as s:
        if s.get(User, user_id) is None:
            raise not_found(f"no user {user_id}")
        audit(s, who.user_id, "token.create", user_id, label=body.label, expires_in_days=days)
    token = issue_token(ctx.db, user_id, body.label, timedelta(days=days))
    with session_scope(ctx.db) as s:
        expires = s.get(ApiToken, token_hash(token))
    return TokenOut(
        token=token,
        sha256=token_hash(token),
        user_id=user_id,
        expires_at=expires.expires_at if expires else None,
    )


@router.get("/tokens", response_model=list[TokenInfoOut])
def tokens(
    ctx: Context,
    who: Admin,
    page: Page,
    request: Request,
    response: Response,
    user: str | None = None,
) -> list[TokenInfoOut]:
    """The tokens (of ``user``), newest first, revoked and expired ones included, a page at a
    time (``ctloop.paging``)."""
    now = datetime.now(UTC)
    after = page.after_key(datetime, str)
    rows = [
        TokenInfoOut(
            sha256=t.sha256,
            user_id=t.user_id,
            label=t.label,
            created_at=t.created_at,
            expires_at=t.expires_at,
            revoked_at=t.revoked_at,
            usable=token_usable(t, now),
        )
        for t in list_tokens(ctx.db, user, page.fetch, after)
    ]
    return one_page(rows, page, lambda t: [t.created_at.isoformat(), t.sha256], request, response)


@router.delete("/tokens/{sha256}", status_code=204)
def revoke(ctx: Context, who: Admin, sha256: str) -> None:
    if not revoke_token(ctx.db, sha256):
        raise not_found("no such active token")
    with session_scope(ctx.db) as s:
        audit(s, who.user_id, "token.revoke", sha256[:12])


@router.get("/audit/verify", response_model=AuditChainOut)
def verify_audit(ctx: Context, who: Admin, anchor: str | None = None) -> AuditChainOut:
    """Check the audit log's hash chain from its oldest row; ``anchor`` (``ID:HASH``, a head an
    earlier check reported) also catches deleted newest rows and a rewritten chain."""
    try:
        pinned = parse_anchor(anchor) if anchor else None
    except ValueError as exc:
        raise ApiError("bad_anchor", str(exc)) from exc
    report = verify_chain(ctx.db, pinned)
    with session_scope(ctx.db) as s:
        audit(s, who.user_id, "audit.verify", "audit_log", ok=report.ok, rows=report.rows)
    return AuditChainOut.model_validate(report.as_dict())


@router.get("/audit", response_model=list[AuditOut])
def audit_log(
    ctx: Context,
    who: Admin,
    page: Page,
    request: Request,
    response: Response,
    resource: str | None = None,
) -> list[AuditOut]:
    """The audit log, newest first, a page at a time (``ctloop.paging``)."""
    with session_scope(ctx.db) as s:
        q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(page.fetch)
        if resource:
            q = q.where(AuditEntry.resource == resource)
        if (after := page.after_key(int)) is not None:
            q = q.where(AuditEntry.id < after[0])
        entries = one_page(list(s.scalars(q)), page, lambda e: [e.id], request, response)
        return [
            AuditOut(
                at=e.at,
                actor=e.actor,
                action=e.action,
                resource=e.resource,
                site_id=e.site_id,
                detail=e.detail,
            )
            for e in entries
        ]

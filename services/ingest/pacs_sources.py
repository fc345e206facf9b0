"""Which DICOMweb services (PACS) each site may pull from.

Two lists, read together: the seed in settings (``services.dicomweb_sources``, from the chart's
``ingest.dicomwebSources``; key ``"*"`` serves every site) and the sources admins add at run
time (table ``site_dicomweb_sources``, :mod:`services.ingest.routers.pacs`). Every URL is held
and compared in one normal form (:func:`ctloop.dicomweb.normal_base_url`), so a pull is allowed
only from a service listed, exactly, for the site the volume lands in. No FastAPI here.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import select

from ctloop import dicomweb
from ctloop.audit_chain import audit
from ctloop.auth import Principal
from ctloop.db import Site, SiteDicomwebSource, session_scope
from ctloop.settings import Settings
from services.ingest.deps import IngestContext
from services.ingest.errors import ApiError, conflict, not_found


@dataclass(frozen=True)
class Source:
    """One allowed service of a site, and where the allowance comes from."""

    site_id: str
    base_url: str
    origin: Literal["settings", "admin"]
    created_at: datetime | None = None


def base_url(url: str) -> str:
    """``url`` in normal form, or a 422 ``bad_source_url``."""
    try:
        return dicomweb.normal_base_url(url)
    except dicomweb.BadBaseUrl as exc:
        raise ApiError("bad_source_url", f"url: {exc}") from exc


def uid(value: str, what: str) -> str:
    """``value`` if it is a DICOM UID, or a 422 ``bad_uid`` (before anything is looked up)."""
    try:
        return dicomweb.check_uid(value, what)
    except dicomweb.BadUid as exc:
        raise ApiError("bad_uid", str(exc)) from exc


def seeded(settings: Settings, site: str) -> list[str]:
    """The site's services from settings (its own and those of every site)."""
    by_site = dicomweb.sources_by_site(settings.services.dicomweb_sources)
    return sorted({*by_site.get(site, []), *by_site.get(dicomweb.ALL_SITES, [])})


def allowed_source(ctx: IngestContext, site: str, url: str) -> str:
    """``url`` in normal form if it is one of ``site``'s services; 403 otherwise, the same
    answer for another site's service as for one nobody configured."""
    normal = base_url(url)
    if normal in seeded(ctx.settings, site):
        return normal
    with session_scope(ctx.db) as s:
        if s.get(SiteDicomwebSource, (site, normal)) is not None:
            return normal
    raise ApiError("source_not_allowed", f"that DICOMweb service is not allowed for {site}", 403)


def sources_of(ctx: IngestContext, site: str) -> list[Source]:
    """Every allowed service of an existing site (404 for others)."""
    listed = [Source(site, url, "settings") for url in seeded(ctx.settings, site)]
    with session_scope(ctx.db) as s:
        _existing_site(s.get(Site, site), site)
        rows = s.scalars(
            select(SiteDicomwebSource)
            .where(SiteDicomwebSource.site_id == site)
            .order_by(SiteDicomwebSource.base_url)
        )
        listed += [Source(site, r.base_url, "admin", r.created_at) for r in rows]
    return listed


def add_source(ctx: IngestContext, who: Principal, site: str, url: str) -> Source:
    """Allow a service for a site (audited); 409 if it already is."""
    normal = base_url(url)
    if normal in seeded(ctx.settings, site):
        raise conflict("exists", f"{normal} is already allowed for {site} by the settings")
    with session_scope(ctx.db) as s:
        _existing_site(s.get(Site, site), site)
        if s.get(SiteDicomwebSource, (site, normal)) is not None:
            raise conflict("exists", f"{normal} is already allowed for {site}")
        row = SiteDicomwebSource(site_id=site, base_url=normal)
        s.add(row)
        audit(s, who.user_id, "dicomweb_source.add", normal, site_id=site)
        s.flush()
        return Source(site, normal, "admin", row.created_at)


def remove_source(ctx: IngestContext, who: Principal, site: str, url: str) -> None:
    """Stop allowing a service an admin added (audited). One from the settings stays until
    the settings change (409): the chart's values are the truth for those."""
    normal = base_url(url)
    with session_scope(ctx.db) as s:
        _existing_site(s.get(Site, site), site)
        row = s.get(SiteDicomwebSource, (site, normal))
        if row is not None:
            s.delete(row)
            audit(s, who.user_id, "dicomweb_source.remove", normal, site_id=site)
            return
    if normal in seeded(ctx.settings, site):
        raise conflict("in_settings", f"{normal} is allowed by services.dicomweb_sources")
    raise not_found(f"{normal} is not a source of {site}")


def _existing_site(row: Site | None, site: str) -> None:
    if row is None:
        raise not_found(f"no site {site}", "unknown_site")

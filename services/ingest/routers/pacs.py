"""``/v1/sites/{site_id}/dicomweb-sources``: the PACS (DICOMweb services) a site's volumes may
be pulled from. Admins only; every change is audited (see :mod:`services.ingest.pacs_sources`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from services.ingest import pacs_sources
from services.ingest.deps import Admin, Context
from services.ingest.schemas import DicomwebSourceIn, DicomwebSourceOut, ErrorOut
from services.ingest.validation import safe_id

router = APIRouter(prefix="/v1/sites/{site_id}/dicomweb-sources", tags=["admin"])

ERRORS: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
    422: {"model": ErrorOut},
}


def _out(source: pacs_sources.Source) -> DicomwebSourceOut:
    return DicomwebSourceOut(
        site_id=source.site_id,
        base_url=source.base_url,
        origin=source.origin,
        created_at=source.created_at,
    )


@router.get("", response_model=list[DicomwebSourceOut], responses=ERRORS)
def list_sources(ctx: Context, who: Admin, site_id: str) -> list[DicomwebSourceOut]:
    """The site's services: from the settings and added here."""
    return [_out(x) for x in pacs_sources.sources_of(ctx, safe_id(site_id, "site id"))]


@router.post("", status_code=201, response_model=DicomwebSourceOut, responses=ERRORS)
def add_source(ctx: Context, who: Admin, site_id: str, body: DicomwebSourceIn) -> DicomwebSourceOut:
    """Allow the site to pull from one more service (stored in normal form)."""
    site = safe_id(site_id, "site id")
    return _out(pacs_sources.add_source(ctx, who, site, body.url))


@router.delete("", status_code=204, responses=ERRORS)
def remove_source(
    ctx: Context,
    who: Admin,
    site_id: str,
    url: Annotated[str, Query(description="the base URL to stop allowing")],
) -> None:
    """Stop allowing a service added here (those from the settings change with the settings)."""
    pacs_sources.remove_source(ctx, who, safe_id(site_id, "site id"), url)

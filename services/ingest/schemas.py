"""Every request and response body of the ingest API (the OpenAPI document is made from these)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from ctloop.auth import ROLES
from ctloop.contracts.payloads import Dataset
from ctloop.core.partial import OrganStatus

# How the work queue picks the next task.
Strategy = Literal["uncertainty", "random", "sequential"]


class VolumeOut(BaseModel):
    volume_id: str
    site_id: str
    dataset: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    sha256: str
    status: str
    labelled: bool
    created_at: datetime


class AnnotationOut(BaseModel):
    volume_id: str
    revision: int
    author: str
    minutes: float
    organs: dict[str, OrganStatus]
    reviewed_slices: list[tuple[int, int]] | None
    created_at: datetime
    review_status: str = "pending"
    reviewer: str | None = None
    review_comment: str = ""


class ReviewIn(BaseModel):
    decision: Literal["approve", "send_back"]
    comment: str = ""


class PredictionOut(BaseModel):
    volume_id: str
    model: str
    version: int
    uncertainty: float
    created_at: datetime


class DicomWebIn(BaseModel):
    url: str = Field(description="base URL of a DICOMweb service allowed for site_id")
    study_uid: str = Field(description="a DICOM UID (digits and '.', at most 64 characters)")
    series_uid: str = Field(description="a DICOM UID (digits and '.', at most 64 characters)")
    site_id: str = Field(description="the site the volume lands in: one of the caller's")
    dataset: Dataset = "clinical"
    volume_id: str | None = None


class PacsTargetIn(BaseModel):
    url: str = Field(description="base URL of a DICOMweb service allowed for the volume's site")


class SegStoredOut(BaseModel):
    volume_id: str
    pacs: str = Field(description="the service, in normal form")
    study_uid: str = Field(description="the original study's UID: the SEG joins it")
    series_uid: str = Field(description="the SEG's own series")
    sop_instance_uid: str
    referenced_series_uid: str = Field(description="the original CT series the SEG is on")
    segments: list[str] = Field(description="the organs it holds")


class DicomwebSourceIn(BaseModel):
    url: str = Field(description="http(s) base URL of the service, e.g. https://pacs/dicom-web")


class DicomwebSourceOut(BaseModel):
    site_id: str
    base_url: str = Field(description="in normal form: what pulls are compared with exactly")
    origin: Literal["settings", "admin"] = Field(
        description="settings: services.dicomweb_sources (the chart); admin: added by the API"
    )
    created_at: datetime | None = None


class ErrorOut(BaseModel):
    code: str
    message: str


class TaskOut(BaseModel):
    volume_id: str
    site_id: str
    expires_at: datetime
    model: str | None = Field(default=None, description="the pre-annotation to start from")
    version: int | None = None
    uncertainty: float | None = None


class ClaimIn(BaseModel):
    strategy: Strategy | None = None
    lease_seconds: float | None = Field(default=None, gt=0, le=24 * 3600)


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
    expires_in_days: int | None = Field(
        default=None, ge=1, le=3650, description="default: the settings' auth.token_lifetime_days"
    )


class TokenOut(BaseModel):
    token: str = Field(description="shown once; only its SHA-256 is kept")
    sha256: str
    user_id: str
    expires_at: datetime | None = None


class TokenInfoOut(BaseModel):
    """A token's record (never the token itself)."""

    sha256: str = Field(description="what DELETE /v1/tokens/{sha256} takes")
    user_id: str
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    usable: bool = Field(description="neither revoked nor expired")


class UserStateOut(BaseModel):
    id: str
    role: str
    display_name: str
    disabled_at: datetime | None


class AuditProblemOut(BaseModel):
    id: int
    kind: str = Field(
        description="edited | link_broken | unhashed | anchor_missing | anchor_changed"
    )
    message: str


class AuditChainOut(BaseModel):
    """The audit log's hash chain, checked from its oldest row."""

    ok: bool
    rows: int
    before_chain: int = Field(description="rows written before the chain existed (no hash)")
    head_id: int | None = Field(description="the newest chained row: keep id:hash as an anchor")
    head_hash: str | None
    problem: AuditProblemOut | None = Field(description="the first row found wrong")


class AuditOut(BaseModel):
    at: datetime
    actor: str
    action: str
    resource: str
    site_id: str | None
    detail: dict[str, Any]


class ViewOut(BaseModel):
    """How one view shows the volume: the plane at ``index`` along voxel axis ``axis``; screen
    rows run along voxel axis ``rows`` (reversed when ``flip_rows``), columns along ``cols``."""

    axis: int
    rows: int
    cols: int
    flip_rows: bool
    flip_cols: bool
    row_mm: float
    col_mm: float
    size: int = Field(description="number of planes along axis")


class OidcClientOut(BaseModel):
    issuer: str
    client_id: str
    scope: str


class WorkbenchConfigOut(BaseModel):
    oidc: OidcClientOut | None = Field(
        description="sign in at this issuer (authorization code + PKCE); null: tokens only"
    )


class OrganOut(BaseModel):
    id: int
    name: str
    colour: str


class LabelSourceOut(BaseModel):
    kind: str = Field(description="prediction | revision | none")
    model: str | None = None
    version: int | None = None
    revision: int | None = None


class ViewerOut(BaseModel):
    volume_id: str
    site_id: str
    dataset: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    affine: list[list[float]]
    views: dict[str, ViewOut]
    intensity: tuple[int, int]
    organs: list[OrganOut]
    labels: LabelSourceOut
    revisions: int
    lease_holder: str | None
    lease_expires_at: datetime | None
    reviewed_axis: int = Field(
        default=2, description="the axis reviewed_slices count along (the volume's 3rd)"
    )


class TaskRow(BaseModel):
    volume_id: str
    site_id: str
    model: str | None = None
    version: int | None = None
    uncertainty: float | None = None
    expires_at: datetime | None = None
    leased: bool = False


class TasksOut(BaseModel):
    user: str
    name: str  # shown to people: an OIDC user's display name (``user`` is their ``sub``)
    role: str
    sites: list[str]
    mine: list[TaskRow]
    waiting: list[TaskRow]


class QueueSize(BaseModel):
    site_id: str
    waiting: int
    leased: int
    annotated: int


class DashboardOut(BaseModel):
    report: dict[str, Any] | None
    metrics_error: str | None = None
    serving: list[dict[str, Any]]
    current_model: dict[str, Any] | None
    queues: list[QueueSize]

"""A volume's latest pre-annotation as a DICOM SEG: on the original series it came from (its
UIDs, frame of reference and pixel grids: ctloop/core/dicom_source.py) or on ctloop's own CT
series (``series.zip``), downloaded or stored back to one of the site's PACS (STOW-RS).

A SEG sent to a PACS carries the patient and study attributes of the original images, read
from that PACS (WADO-RS metadata of one instance) as it is sent and never stored, so the SEG
joins the same patient's study there. No FastAPI here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from pydicom.dataset import Dataset

from ctloop import dicomweb
from ctloop.audit_chain import audit
from ctloop.auth import Principal
from ctloop.core import dicom
from ctloop.core.blobs import nifti_from_gz
from ctloop.core.dicom_source import (
    SourceSeries,
    mask_on_source,
    patient_study_module,
    source_images,
)
from ctloop.db import session_scope
from services.ingest.deps import IngestContext
from services.ingest.errors import ApiError, conflict
from services.ingest.pacs_sources import allowed_source
from services.ingest.records import image_blob, required_prediction, visible_volume

log = logging.getLogger("ctloop.ingest")

Reference = Literal["auto", "original", "ctloop"]


@dataclass(frozen=True)
class _Prediction:
    site: str
    mask_key: str
    image: tuple[str, str | None]
    algorithm: str
    source: SourceSeries | None


def _prediction(
    ctx: IngestContext, who: Principal, volume_id: str, action: str, **detail: str
) -> _Prediction:
    with session_scope(ctx.db) as s:
        p = required_prediction(s, volume_id, who)
        v = visible_volume(s, volume_id, who)
        raw = (v.geometry or {}).get("source_series")
        found = _Prediction(
            site=v.site_id,
            mask_key=p.s3_key,
            image=tuple(image_blob(v)),  # type: ignore[arg-type]
            algorithm=f"{p.model} v{p.version}",
            source=SourceSeries.model_validate(raw) if raw else None,
        )
        audit(s, who.user_id, action, volume_id, site_id=v.site_id, **detail)
    return found


def _seg(
    ctx: IngestContext,
    volume_id: str,
    pred: _Prediction,
    original: bool,
    patient_study: Dataset | None = None,
) -> Dataset:
    mask_img = nifti_from_gz(ctx.store.get_bytes(ctx.bucket, pred.mask_key))
    mask = np.asarray(mask_img.dataobj, np.uint8)
    what = f"prediction {pred.algorithm}"
    try:
        if original:
            assert pred.source is not None
            frames = mask_on_source(mask, np.asarray(mask_img.affine), pred.source)
            images = source_images(pred.source, patient_study)
            return dicom.segmentation_of_frames(
                frames, images, volume_id, f"{what} original", pred.algorithm
            )
        key, version = pred.image
        img = nifti_from_gz(ctx.store.get_bytes(ctx.bucket, key, version))
        series = dicom.ct_series(np.asarray(img.dataobj), np.asarray(img.affine), volume_id)
        return dicom.segmentation(mask, series, volume_id, what, pred.algorithm)
    except ValueError as exc:  # "the mask holds no organ"
        raise conflict("empty_prediction", f"{volume_id}: {exc}") from exc


def _original(pred: _Prediction, volume_id: str, reference: Reference) -> bool:
    if reference == "ctloop":
        return False
    if pred.source is None:
        if reference == "original":
            raise conflict(
                "no_original_series",
                f"{volume_id} did not come from a DICOM series ctloop can reference (a NIfTI "
                "upload, an enhanced multi-frame image, or a series without study, series or "
                "frame-of-reference UIDs): its SEG references ctloop's series.zip",
            )
        return False
    return True


def prediction_seg(
    ctx: IngestContext, who: Principal, volume_id: str, reference: Reference = "auto"
) -> Dataset:
    """The latest pre-annotation as a SEG. ``auto``: on the original series when the volume
    came from one, else on ``series.zip``; ``original`` insists (409 ``no_original_series``);
    ``ctloop``: always on ``series.zip``. Patient and study attributes are empty."""
    pred = _prediction(ctx, who, volume_id, "prediction.read", form="seg")
    return _seg(ctx, volume_id, pred, _original(pred, volume_id, reference))


def store_seg_in_pacs(
    ctx: IngestContext, who: Principal, volume_id: str, url: str
) -> dict[str, Any]:
    """The latest pre-annotation as a SEG on the original series, with the patient and study
    attributes of the original images as ``url`` (one of the volume's site's PACS) holds them,
    stored there with STOW-RS. 403 for a PACS not allowed for the site; 409 when the volume
    has no original series; 422 ``dicomweb`` when the PACS does not hold the original images
    or refuses the SEG."""
    with session_scope(ctx.db) as s:
        site = visible_volume(s, volume_id, who).site_id
    url = allowed_source(ctx, site, url)
    pred = _prediction(ctx, who, volume_id, "prediction.export", pacs=url)
    _original(pred, volume_id, "original")
    assert pred.source is not None
    first = pred.source.instances[0].sop_instance_uid
    try:
        metadata = dicomweb.instance_metadata(
            url, pred.source.study_uid, pred.source.series_uid, first
        )
        seg = _seg(ctx, volume_id, pred, True, patient_study_module(metadata))
        dicomweb.store_instance(url, seg)
    except dicomweb.DicomWebError as exc:
        raise ApiError("dicomweb", f"{url}: {exc}", 422) from exc
    with session_scope(ctx.db) as s:
        audit(
            s,
            who.user_id,
            "prediction.stored_in_pacs",
            volume_id,
            site_id=site,
            pacs=url,
            sop_instance_uid=str(seg.SOPInstanceUID),
        )
    log.info("SEG stored in PACS", extra={"volume_id": volume_id, "pacs": url})
    return {
        "volume_id": volume_id,
        "pacs": url,
        "study_uid": str(seg.StudyInstanceUID),
        "series_uid": str(seg.SeriesInstanceUID),
        "sop_instance_uid": str(seg.SOPInstanceUID),
        "referenced_series_uid": pred.source.series_uid,
        "segments": [str(d.SegmentLabel) for d in seg.SegmentSequence],
    }

"""A transfer run's data into the platform through the public API, as a hospital's tools would
send it: the sites, then every volume with its dataset (labels only where the dataset has them;
the clinical volumes' truth is never uploaded)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.transfer import RunFailed
from ctloop.transfer.presets import PUBLIC_SITE, SITES
from ctloop.transfer.volumes import Volumes


def upload_volumes(admin: httpx.Client, data: Volumes, echo: Callable[[str], None]) -> None:
    """Create the run's sites and upload ``data``: public (labelled), evaluation and public
    test (labelled, never trained on), clinical (no label)."""
    for site in (PUBLIC_SITE, *SITES):
        r = admin.post("/v1/sites", json={"id": site})
        if r.status_code not in (201, 409):
            raise RunFailed(f"creating site {site}: {r.text}")

    def upload(vid: str, site: str, dataset: str, image: Any, affine: Any, label: Any) -> None:
        files = {"file": ("ct.nii.gz", nifti_gz_bytes(image, affine), "application/gzip")}
        if label is not None:
            files["label"] = ("label.nii.gz", nifti_gz_bytes(label, affine), "application/gzip")
        r = admin.post(
            "/v1/volumes",
            files=files,
            data={"site_id": site, "dataset": dataset, "volume_id": vid},
        )
        if r.status_code not in (200, 201):
            raise RunFailed(f"uploading {vid}: {r.status_code} {r.text}")

    total = len(data.public) + len(data.clinical) + len(data.evaluation) + len(data.public_test)
    done = 0
    for vid, (image, affine, label) in data.public.items():
        upload(vid, PUBLIC_SITE, "public", image, affine, label)
        done += 1
    echo(f"  ingest {done}/{total} volumes (public, labelled)")
    for vid, (image, affine, label) in data.evaluation.items():
        upload(vid, SITES[0], "evaluation", image, affine, label)
        done += 1
    for vid, (image, affine, label) in data.public_test.items():  # held out: forgetting
        upload(vid, PUBLIC_SITE, "public-test", image, affine, label)
        done += 1
    for vid, (site, image, affine) in data.clinical.items():
        upload(vid, site, "clinical", image, affine, None)
        done += 1
    echo(f"  ingest {done}/{total} volumes (+ clinical, evaluation and public test)")

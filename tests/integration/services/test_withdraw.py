"""Withdrawing a volume (MONAI Label's datastore delete, ``DELETE /v1/volumes/{id}``): admins
only; the volume leaves the queue, the datastore, inference's re-predictions and training's
lists, while its row, blobs and revisions stay and its id stays taken."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ctloop.db import Volume, session_scope, waiting_for_annotation
from ctloop.storage import ObjectStore
from ctloop.v1 import ingest_pb2
from services.ingest.app import create_app
from services.ingest.grpc_api import WorkflowService
from tests.helpers.volumes import nifti, phantom


@pytest.fixture(scope="module")
def api(svc_settings, admin_headers):
    with TestClient(create_app(svc_settings), headers=admin_headers) as client:
        yield client


def _clinical(api, vid: str, site: str, seed: int) -> None:
    p = phantom(seed=seed)
    files = {"file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip")}
    r = api.post(
        "/v1/volumes", files=files, data={"site_id": site, "dataset": "clinical", "volume_id": vid}
    )
    assert r.status_code == 201, r.text


def _annotate(api, vid: str, seed: int, headers=None):
    p = phantom(seed=seed)
    files = {"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")}
    return api.post(
        f"/v1/volumes/{vid}/annotations", files=files, data={"minutes": "3"}, headers=headers
    )


def test_a_withdrawn_volume_leaves_the_loop_and_keeps_its_data(api, svc_settings, unique):
    site = f"wd-{unique}"
    assert api.post("/v1/sites", json={"id": site}).status_code == 201
    r = api.post("/v1/users", json={"id": f"rev-{unique}", "role": "reviewer", "sites": [site]})
    assert r.status_code == 201, r.text
    token = api.post(f"/v1/users/rev-{unique}/tokens", json={}).json()["token"]
    reviewer = {"Authorization": f"Bearer {token}"}
    kept, gone, trained = f"keep-{unique}", f"gone-{unique}", f"done-{unique}"
    for n, vid in enumerate((kept, gone, trained)):
        _clinical(api, vid, site, 700 + n)
    assert _annotate(api, trained, 702).status_code == 201

    # Only admins withdraw: MONAI Label's delete and /v1
    assert api.delete("/datastore/", params={"id": gone}, headers=reviewer).status_code == 403
    assert api.delete(f"/v1/volumes/{gone}", headers=reviewer).status_code == 403
    assert api.delete("/datastore/", params={"id": gone}).json() == {}
    out = api.delete(f"/v1/volumes/{trained}")
    assert out.status_code == 200 and out.json()["status"] == "withdrawn"
    assert api.delete(f"/v1/volumes/{gone}").json()["status"] == "withdrawn"  # again: the same
    assert api.delete("/v1/volumes/no-such-volume").status_code == 404

    # Out of the queue, the datastore, re-predictions and training's lists
    with session_scope(svc_settings.database_url) as s:
        waiting = {row.id for row in s.execute(waiting_for_annotation()).all()}
        assert kept in waiting and gone not in waiting
        image_key = s.get(Volume, gone).s3_key
    objects = api.get("/datastore/", params={"output": "all"}, headers=reviewer).json()["objects"]
    assert set(objects) == {kept}
    workflow = WorkflowService(svc_settings.database_url, svc_settings.s3.bucket)
    listed = workflow.ListTrainingVolumes(
        ingest_pb2.ListTrainingVolumesRequest(dataset="clinical"), None
    )
    assert trained not in {v.volume.volume_id for v in listed.volumes}
    assert _annotate(api, gone, 701).json()["code"] == "withdrawn"

    # Kept: the row (status withdrawn), the image, the revision, the id; and audited
    assert api.get(f"/v1/volumes/{gone}").json()["status"] == "withdrawn"
    assert ObjectStore(svc_settings).exists(svc_settings.s3.bucket, image_key)
    assert len(api.get(f"/v1/volumes/{trained}/annotations").json()) == 1
    p = phantom(seed=701)
    files = {"file": ("ct.nii.gz", nifti(p.image, p.affine), "application/gzip")}
    again = api.post(
        "/v1/volumes", files=files, data={"site_id": site, "dataset": "clinical", "volume_id": gone}
    )
    assert again.status_code == 200 and again.json()["status"] == "withdrawn"  # the same bytes
    entries = api.get("/v1/audit", params={"resource": gone, "limit": 50}).json()
    (withdrawal,) = [e for e in entries if e["action"] == "volume.withdraw"]
    assert withdrawal["detail"]["via"] == "monailabel" and withdrawal["detail"]["was"] == "ingested"

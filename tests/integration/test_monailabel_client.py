"""3D Slicer's MONAILabel flow against ctloop, driven by MONAI Label's own Python client
(``monailabel.client.MONAILabelClient``, the code the Slicer extension's calls mirror):
auth -> upload a local volume -> its pre-annotation -> info -> datastore -> model digest ->
a session (a CT segmented outside the loop) -> next sample -> infer -> save label -> train ->
train status -> batch infer -> scoring -> logs, all four services real processes on the real
stack."""

from __future__ import annotations

import gzip
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest
from monailabel.client.client import MONAILabelClient, MONAILabelClientException

from ctloop.contracts import keys
from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.organs import FOREGROUND, ORGAN_IDS
from ctloop.core.phantom import generate_phantom
from ctloop.platform import until
from ctloop.storage import ObjectStore
from tests.helpers.platform import run_platform

PORTS = {"INGEST": 28720, "INFERENCE": 28722, "TRAINING": 28724, "METRICS": 28726}


@pytest.fixture
def platform(tmp_path: Path):
    # Rounds start only when asked for (through MONAI Label's /train), not by the policy.
    extra = {"CTLOOP_TRAINING__ROUND_MIN_NEW": "1000", "CTLOOP_SERVICES__SESSION_SWEEP_S": "1"}
    with run_platform(tmp_path, PORTS, extra) as running:
        yield running


def _upload(admin: httpx.Client, vid: str, site: str, dataset: str, seed: int):
    p = generate_phantom("public" if dataset == "public" else "clinical-a", seed, "tiny")
    files = {"file": ("ct.nii.gz", nifti_gz_bytes(p.image, p.affine), "application/gzip")}
    if dataset == "public":
        files["label"] = ("l.nii.gz", nifti_gz_bytes(p.label, p.affine), "application/gzip")
    data = {"site_id": site, "dataset": dataset, "volume_id": vid}
    r = admin.post("/v1/volumes", files=files, data=data)
    assert r.status_code == 201, r.text
    return p


def _sites_and_reviewer(admin: httpx.Client) -> str:
    """Three sites and rita, a reviewer at hospital-a; her API token."""
    for site in ("hospital-a", "hospital-b", "public-site"):
        assert admin.post("/v1/sites", json={"id": site}).status_code == 201
    r = admin.post("/v1/users", json={"id": "rita", "role": "reviewer", "sites": ["hospital-a"]})
    assert r.status_code == 201, r.text
    return admin.post("/v1/users/rita/tokens", json={"label": "slicer"}).json()["token"]


def _volumes_pre_annotated(
    admin: httpx.Client, client: MONAILabelClient, tag: str, igniter: str, logs, tmp_path: Path
):
    """Public volumes, two of hers (one uploaded from her disk through MONAI Label's client)
    and one of another site's, all pre-annotated by the igniter; (her volumes' phantoms by id,
    the other site's volume id)."""
    for i in range(3):
        _upload(admin, f"pub{i}-{tag}", "public-site", "public", 100 + i)
    mine = {f"a0-{tag}": _upload(admin, f"a0-{tag}", "hospital-a", "clinical", 200)}
    local = generate_phantom("clinical-a", 201, "tiny")
    path = tmp_path / "local-ct.nii.gz"
    path.write_bytes(nifti_gz_bytes(local.image, local.affine))
    up = client.upload_image(str(path), image_id=f"a1-{tag}")  # her only site: hospital-a
    assert up == {"image": f"a1-{tag}", "site_id": "hospital-a", "status": "ingested"}
    again = client.upload_image(str(path), image_id=f"a1-{tag}")  # the same bytes: the same
    assert again["image"] == f"a1-{tag}"
    mine[f"a1-{tag}"] = local
    theirs = f"b0-{tag}"
    _upload(admin, theirs, "hospital-b", "clinical", 300)

    def pre_annotated() -> bool:
        for vid in [*mine, theirs]:
            r = admin.get(f"/v1/volumes/{vid}/prediction")
            if r.status_code != 200 or r.json()["model"] != igniter:
                return False
        return True

    until("igniter pre-annotations", pre_annotated, 300, logs)
    return mine, theirs


def _slicer_signs_in(api: str, tmp_path: Path, rita_token: str) -> MONAILabelClient:
    """Slicer: the server wants auth; user name + API token give a bearer token."""
    client = MONAILabelClient(api, tmpdir=str(tmp_path))
    assert client.auth_enabled()
    with pytest.raises(MONAILabelClientException):
        client.info()  # no token yet
    with pytest.raises(MONAILabelClientException):
        client.auth_token("somebody-else", rita_token)
    client.update_auth(client.auth_token("rita", rita_token))
    assert client.auth_valid_token()
    return client


def _uploaded_and_pre_annotated(client: MONAILabelClient, admin: httpx.Client, vid: str):
    """Her upload's pre-annotation comes back as its original label, as /v1 stores it."""
    original = nib.load(client.download_label(vid, "original"))
    stored = admin.get(f"/v1/volumes/{vid}/prediction/mask")
    assert stored.status_code == 200
    expected = nib.Nifti1Image.from_bytes(gzip.decompress(stored.content))
    assert np.array_equal(np.asarray(original.dataobj), np.asarray(expected.dataobj))


def _model_info(rita: httpx.Client, admin: httpx.Client, igniter: str) -> None:
    """The serving model's latest version and the digest recorded at publish, for anyone; its
    weights are not served by the API (ingest has no grant on the model repository)."""
    answer = rita.get("/model/info/segmentation")
    assert answer.status_code == 200, answer.text
    info = answer.json()
    assert info["model"] == igniter and info["version"] == 1 and info["modified_time"] > 0
    assert len(info["checksum"]) == 64
    assert rita.get(f"/model/info/{igniter}").json() == info
    assert rita.get("/model/segmentation").status_code == 403
    refused = admin.get("/model/segmentation")
    assert refused.status_code == 409 and refused.json()["code"] == "not_served_here"


def _info_lists_models_and_datastore(client: MONAILabelClient, igniter: str, sustainer: str):
    info = client.info()
    assert info["labels"] == list(FOREGROUND)
    assert {"segmentation", igniter, sustainer} <= set(info["models"])
    assert info["models"]["segmentation"]["labels"]["liver"] == ORGAN_IDS["liver"]
    assert {"uncertainty", "random", "sequential"} <= set(info["strategies"])
    assert info["datastore"] == {
        "total": 2,
        "completed": 0,
        "label_tags": {"final": 0, "original": 2},
    }


def _only_her_site(client: MONAILabelClient, api: str, rita_token: str, mine, theirs: str):
    """Only her site's volumes are in her datastore; another site's image is not found."""
    store = client.datastore()
    assert set(store["objects"]) == set(mine)
    rita = httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {rita_token}"})
    assert rita.get("/datastore/image", params={"image": theirs}).status_code == 404
    assert rita.post("/infer/segmentation", params={"image": theirs}).status_code == 404
    return rita


def _next_sample_inferred(client: MONAILabelClient, rita: httpx.Client, mine, saved, igniter):
    """The next sample: a leased task of hers, its image, the igniter's inference on its grid."""
    sample = client.next_sample("uncertainty", {})
    vid = sample["id"]
    assert vid in mine and vid not in saved and sample["model"] == igniter
    # The sample is a leased task of hers (renewable like one from /v1/tasks/next).
    assert rita.post(f"/v1/tasks/{vid}/renew").status_code == 200

    image = rita.get("/datastore/image", params={"image": vid})
    assert image.status_code == 200
    grid = nib.Nifti1Image.from_bytes(gzip.decompress(image.content))
    result_file, params = client.infer("segmentation", vid, {})
    assert params["model"] == igniter and params["version"] == 1
    pred = nib.load(result_file)
    assert pred.shape == grid.shape
    assert np.allclose(pred.affine, grid.affine, atol=1e-4)
    assert set(np.unique(np.asarray(pred.dataobj))) <= set(ORGAN_IDS.values())
    return vid


def _label_saved(client: MONAILabelClient, mine, vid: str, n: int, tmp_path: Path) -> None:
    """Her correction: the truth (the phantom's label), pancreas left unreviewed once."""
    truth = mine[vid].label
    label_path = tmp_path / f"{vid}-label.nii.gz"
    label_path.write_bytes(nifti_gz_bytes(truth, mine[vid].affine))
    extra = {"organs": {"pancreas": "skipped"}, "minutes": 7.5} if n == 0 else {}
    out = client.save_label(vid, str(label_path), tag="final", params=extra)
    assert out["revision"] == 1


def _label_read_back(client, rita: httpx.Client, mine, vid: str, n: int) -> None:
    truth = mine[vid].label
    back = nib.load(client.download_label(vid, "final"))
    assert np.array_equal(np.asarray(back.dataobj, np.uint8), truth)
    (rev,) = rita.get(f"/v1/volumes/{vid}/annotations").json()
    assert rev["author"] == "rita"
    if n == 0:
        assert rev["organs"] == {"pancreas": "skipped"} and rev["minutes"] == 7.5
    else:
        assert rev["organs"] == {} and 0.0 <= rev["minutes"] < 30.0  # since her claim


def _nothing_left(client: MONAILabelClient, saved: list[str]) -> None:
    with pytest.raises(MONAILabelClientException):
        client.next_sample("uncertainty", {})  # nothing of hers is left
    labels = client.datastore()["objects"][saved[0]]["labels"]
    assert labels["final"]["ext"] == ".nii.gz"
    # the stored pre-annotation is listed too: Slicer loads it instead of inferring again
    assert labels["original"]["ext"] == ".nii.gz"
    assert client.info()["datastore"]["completed"] == 2


def _sustainer_round_from_client(client: MONAILabelClient, sustainer: str, logs) -> None:
    """A sustainer round on her annotations, started and watched from the client."""
    task = client.train_start(sustainer, {})
    assert task["type"] == "train" and task["model"] == sustainer

    def finished():
        status = client.train_status()
        return status if status["status"] != "RUNNING" else None

    done = until("the sustainer round", finished, 300, logs)
    assert done["status"] == "DONE" and done["ctloop_status"] == "published", str(done)
    assert not client.train_status(check_if_running=True)


def _sustainer_serves(client, rita: httpx.Client, sustainer: str, saved: list[str], logs):
    """Once Triton has loaded it, the new model answers inference by name and as the default."""

    def serving() -> bool:
        r = rita.post(f"/infer/{sustainer}", params={"image": saved[0], "output": "json"})
        assert r.status_code in (200, 409), r.text  # 409 not_serving: still loading
        return r.status_code == 200

    until("the sustainer serving", serving, 120, logs)
    _, params = client.infer("segmentation", saved[0], {})
    assert params["model"] == sustainer and params["version"] == 1


def _batch_scoring_and_logs(admin: httpx.Client, rita: httpx.Client, sustainer: str, mine, logs):
    """Batch inference (admins) pre-annotates every clinical volume with the serving model in
    the background; scoring returns her volumes' uncertainties; logs are the admin's."""
    assert rita.post("/batch/infer/segmentation").status_code == 403
    started = admin.post("/batch/infer/segmentation", params={"images": "all"})
    assert started.status_code == 200, started.text
    assert started.json()["total"] == 3  # a0, a1 and the other site's b0: the admin's view

    def finished():
        task = admin.get("/batch/infer").json()
        return task if task["status"] != "RUNNING" else None

    task = until("the batch inference", finished, 300, logs)
    assert task["status"] == "DONE" and task["done"] == 3 and task["failed"] == {}, task
    for vid in mine:
        assert admin.get(f"/v1/volumes/{vid}/prediction").json()["model"] == sustainer
    scored = rita.post("/scoring/uncertainty").json()
    assert set(scored["result"]) == set(mine)
    assert all(0.0 <= r["uncertainty"] <= 1.0 for r in scored["result"].values())
    assert rita.get("/scoring/").json()["id"] == scored["id"]
    assert rita.get("/logs/").status_code == 403
    lines = admin.get("/logs/", params={"lines": 20}).text.splitlines()
    assert 0 < len(lines) <= 20 and all(line.startswith("{") for line in lines)


def _session_objects(settings, site: str, sid: str) -> list[str]:
    """Every version and delete marker of the session's image and masks."""
    store = ObjectStore(settings)
    found = []
    for key in (keys.session_image(site, sid), keys.session_masks(site, sid)):
        listed = store.client.list_objects(
            settings.s3.bucket, prefix=key, recursive=True, include_version=True
        )
        found += [f"{o.object_name}@{o.version_id}" for o in listed]
    return found


def _fresh(client: MONAILabelClient, tmp_path: Path) -> MONAILabelClient:
    fresh = MONAILabelClient(client._server_url, tmpdir=str(tmp_path))
    fresh._headers = {"Authorization": client._headers["Authorization"]}
    return fresh


def _sessions(
    client: MONAILabelClient, admin: httpx.Client, api: str, settings, igniter: str, tmp_path: Path
) -> None:
    """Slicer segments a CT from her disk in a session: checked like an upload, segmented by
    the serving model, never a volume of the loop, hers alone, and gone (every version) when
    she ends it or it expires."""
    p = generate_phantom("clinical-a", 77, "tiny")
    path = tmp_path / "local-ct.nii.gz"
    path.write_bytes(nifti_gz_bytes(p.image, p.affine))
    # MONAI Label's client keeps the Content-Type and -Length of its last multipart request
    # in its headers (http_multipart updates the dict it was given: the client's own), which
    # breaks its next plain upload; a client as Slicer starts it has only its token.
    client = _fresh(client, tmp_path)
    opened = client.create_session(str(path))
    sid = opened["session_id"]
    assert opened["session_info"]["image"] == "local-ct.nii.gz"
    assert opened["session_info"]["expiry"] == 3600
    assert opened["session_info"]["meta"]["site_id"] == "hospital-a"
    mask_file, params = client.infer("segmentation", "", {}, session_id=sid)
    assert params["model"] == igniter and params["version"] == 1
    mask = nib.load(mask_file)
    assert mask.shape == p.image.shape and np.allclose(mask.affine, p.affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj))) <= set(ORGAN_IDS.values())
    again, _ = client.infer("segmentation", "", {}, session_id=sid)  # kept: not segmented twice
    assert np.array_equal(np.asarray(nib.load(again).dataobj), np.asarray(mask.dataobj))
    assert client.get_session(sid)["meta"]["masks"] == [f"{igniter}:1"]
    objects = _session_objects(settings, "hospital-a", sid)
    assert len(objects) == 2, objects  # the image and one mask

    # Never a volume: not in the datastore, the API, the queue or a round.
    assert sid not in client.datastore()["objects"]
    assert admin.get(f"/v1/volumes/{sid}").status_code == 404
    # Hers alone: a colleague at her site gets 404; bad input changes nothing.
    r = admin.post("/v1/users", json={"id": "bo", "role": "annotator", "sites": ["hospital-a"]})
    assert r.status_code == 201, r.text
    bo_token = admin.post("/v1/users/bo/tokens", json={"label": "t"}).json()["token"]
    bo = httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {bo_token}"})
    assert bo.get(f"/session/{sid}").status_code == 404
    assert bo.delete(f"/session/{sid}").status_code == 404
    assert bo.post("/infer/segmentation", params={"session_id": sid}).status_code == 404
    assert admin.get(f"/session/{sid}").status_code == 200  # an admin sees it
    broken = bo.put("/session/", files={"files": ("x.nii.gz", b"not a CT", "application/gzip")})
    assert broken.status_code == 422, broken.text
    two = bo.put("/session/", files=[("files", ("a.nii.gz", b"a")), ("files", ("b.nii.gz", b"b"))])
    assert two.status_code == 422 and two.json()["code"] == "one_file", two.text

    # Ended by her: image and mask removed, every version; then 404.
    client.remove_session(sid)
    assert _session_objects(settings, "hospital-a", sid) == []
    with pytest.raises(MONAILabelClientException):
        client.get_session(sid)

    # Expired: removed by the sweeper without anyone asking.
    short = bo.put(
        "/session/",
        params={"expiry": 1},
        files={"files": ("ct.nii.gz", path.read_bytes(), "application/gzip")},
    )
    assert short.status_code == 200, short.text
    gone = short.json()["session_id"]
    assert _session_objects(settings, "hospital-a", gone)
    until(
        "the expired session removed",
        lambda: not _session_objects(settings, "hospital-a", gone),
        60,
        None,
    )
    assert bo.get(f"/session/{gone}").status_code == 404
    actions = {
        (e["action"], e["resource"]) for e in admin.get("/v1/audit", params={"limit": 1000}).json()
    }
    assert {
        ("session.create", sid),
        ("session.segment", sid),
        ("session.delete", sid),
        ("session.expired", gone),
    } <= actions


def _all_audited(admin: httpx.Client, saved: list[str]) -> None:
    """Every read and write went into the audit log, with who did it."""
    entries = admin.get("/v1/audit", params={"limit": 1000}).json()
    rita_did = {(e["action"], e["resource"]) for e in entries if e["actor"] == "rita"}
    for vid in saved:
        for action in ("task.claim", "volume.read", "prediction.read", "annotation.create"):
            assert (action, vid) in rita_did, (action, vid)
        assert ("annotation.read", vid) in rita_did
    assert any(a == "training.start" for a, _ in rita_did)
    via = [e for e in entries if e["actor"] == "rita" and e["action"] == "volume.read"]
    assert all(e["detail"].get("via") == "monailabel" for e in via)


def test_slicer_flow_with_monailabel_client(platform, settings, tmp_path: Path):
    tag, logs, api = platform["tag"], platform["logs"], platform["api"]
    igniter, sustainer = f"igniter{tag}", f"sustainer{tag}"
    admin = httpx.Client(
        base_url=api, timeout=60, headers={"Authorization": f"Bearer {platform['admin_token']}"}
    )
    rita_token = _sites_and_reviewer(admin)
    client = _slicer_signs_in(api, tmp_path, rita_token)
    mine, theirs = _volumes_pre_annotated(admin, client, tag, igniter, logs, tmp_path)
    _uploaded_and_pre_annotated(client, admin, f"a1-{tag}")
    _info_lists_models_and_datastore(client, igniter, sustainer)
    rita = _only_her_site(client, api, rita_token, mine, theirs)
    _model_info(rita, admin, igniter)
    _sessions(client, admin, api, settings, igniter, tmp_path)
    saved: list[str] = []
    for n in range(2):
        vid = _next_sample_inferred(client, rita, mine, saved, igniter)
        _label_saved(client, mine, vid, n, tmp_path)
        saved.append(vid)
        _label_read_back(client, rita, mine, vid, n)
    _nothing_left(client, saved)
    _sustainer_round_from_client(client, sustainer, logs)
    _sustainer_serves(client, rita, sustainer, saved, logs)
    _batch_scoring_and_logs(admin, rita, sustainer, mine, logs)
    _all_audited(admin, saved)

"""DICOMweb pulls per site (issue 18, finding 3), against two real Orthanc PACS: each site pulls
only from its own services into its own volumes, UIDs are DICOM UIDs before they reach a URL,
and the admin API that allows a site's services is admin-only and audited."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import uvicorn
from fastapi.testclient import TestClient

from ctloop.core.dicom import ct_series, to_bytes
from services.ingest.app import create_app
from tests.helpers.net import free_port
from tests.helpers.orthanc import run_orthanc_anywhere, store_instances
from tests.helpers.volumes import phantom


@dataclass(frozen=True)
class Series:
    pacs: str  # the DICOMweb base URL that holds it
    study_uid: str
    series_uid: str


@dataclass(frozen=True)
class World:
    site_a: str
    site_b: str
    alice: dict[str, str]  # a reviewer of site A only
    series_a: Series  # on site A's PACS (allowed by the settings)
    series_b: Series  # on site B's PACS (allowed by an admin, through the API)


@pytest.fixture(scope="module")
def pacs_a(tmp_path_factory):
    with run_orthanc_anywhere(tmp_path_factory.mktemp("pacs-a")) as url:
        yield url


@pytest.fixture(scope="module")
def pacs_b(tmp_path_factory):
    with run_orthanc_anywhere(tmp_path_factory.mktemp("pacs-b")) as url:
        yield url


@pytest.fixture(scope="module")
def site_ids():
    import uuid

    tag = uuid.uuid4().hex[:8]
    return f"dw-a-{tag}", f"dw-b-{tag}"


@pytest.fixture(scope="module")
def app(svc_settings, site_ids, pacs_a):
    """The ingest app; its settings allow site A's PACS for site A only."""
    services = svc_settings.services.model_copy(
        update={"dicomweb_sources": {site_ids[0]: [pacs_a]}}
    )
    return create_app(svc_settings.model_copy(update={"services": services}))


@pytest.fixture(scope="module")
def admin(app, admin_headers):
    """The ingest API as its admin."""
    with TestClient(app, headers=admin_headers) as client:
        yield client


@pytest.fixture(scope="module")
def served(app) -> Iterator[str]:
    """The same app on a real socket (uvicorn), for the command line; yields its URL."""
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "ingest did not start"
        time.sleep(0.1)
    yield f"http://127.0.0.1:{server.config.port}"
    server.should_exit = True
    thread.join(timeout=30)


def _series_on(pacs: str, seed: int, name: str) -> Series:
    p = phantom(seed=seed)
    series = ct_series(p.image, p.affine, name)
    store_instances(pacs, [to_bytes(ds) for ds in series])
    return Series(pacs, series[0].StudyInstanceUID, series[0].SeriesInstanceUID)


def _user(admin: TestClient, user: str, site: str) -> dict[str, str]:
    made = admin.post("/v1/users", json={"id": user, "role": "reviewer", "sites": [site]})
    assert made.status_code == 201, made.text
    token = admin.post(f"/v1/users/{user}/tokens", json={}).json()["token"]
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def world(admin, site_ids, pacs_a, pacs_b) -> World:
    site_a, site_b = site_ids
    for site in site_ids:
        assert admin.post("/v1/sites", json={"id": site}).status_code == 201
    added = admin.post(f"/v1/sites/{site_b}/dicomweb-sources", json={"url": pacs_b})
    assert added.status_code == 201, added.text
    return World(
        site_a,
        site_b,
        _user(admin, f"alice-{site_a}", site_a),
        _series_on(pacs_a, 91, f"dw-a-{site_a}"),
        _series_on(pacs_b, 92, f"dw-b-{site_b}"),
    )


def _pull(client: TestClient, series: Series, site: str, headers=None, **change):
    body = {
        "url": series.pacs,
        "study_uid": series.study_uid,
        "series_uid": series.series_uid,
        "site_id": site,
        **change,
    }
    return client.post("/v1/volumes/dicomweb", json=body, headers=headers)


def test_a_sites_user_pulls_from_the_sites_own_pacs(admin, world):
    r = _pull(admin, world.series_a, world.site_a, world.alice, volume_id=f"v-{world.site_a}")
    assert r.status_code == 201, r.text
    assert r.json()["site_id"] == world.site_a
    # Another spelling of the same service (case, default port left out, trailing '/') is it.
    respelled = world.series_a.pacs.replace("http://", "HTTP://") + "/"
    again = _pull(
        admin,
        world.series_a,
        world.site_a,
        world.alice,
        url=respelled,
        volume_id=f"v-{world.site_a}",
    )
    assert again.status_code == 200, again.text  # the same series: the volume it made
    trail = admin.get("/v1/audit", params={"resource": f"v-{world.site_a}"}).json()
    (created,) = [e for e in trail if e["action"] == "volume.create"]
    assert created["actor"] == f"alice-{world.site_a}"
    assert created["detail"]["pacs"] == world.series_a.pacs


def test_another_sites_pacs_is_refused_like_any_unlisted_service(admin, world):
    # B's PACS serves B (the admin's pull lands there) ...
    into_b = _pull(admin, world.series_b, world.site_b, volume_id=f"v-{world.site_b}")
    assert into_b.status_code == 201, into_b.text
    # ... but not A, for A's user or even for an admin.
    for headers in (world.alice, None):
        r = _pull(admin, world.series_b, world.site_a, headers, volume_id=f"x-{world.site_a}")
        assert r.status_code == 403 and r.json()["code"] == "source_not_allowed", r.text
    # Near spellings name other services: compared exactly, never by prefix.
    port = world.series_a.pacs.rsplit(":", 1)[1].split("/")[0]
    for url in (
        world.series_a.pacs.removesuffix("/dicom-web"),
        world.series_a.pacs + "/studies",
        world.series_a.pacs.replace("127.0.0.1", "localhost"),
        f"https://127.0.0.1:{port}/dicom-web",
    ):
        r = _pull(admin, world.series_a, world.site_a, world.alice, url=url)
        assert r.status_code == 403 and r.json()["code"] == "source_not_allowed", url
    assert admin.get(f"/v1/volumes/x-{world.site_a}").status_code == 404


def test_a_pull_into_a_site_you_do_not_belong_to_answers_like_a_missing_site(admin, world):
    into_b = _pull(admin, world.series_b, world.site_b, world.alice)
    missing = _pull(admin, world.series_b, f"nowhere-{world.site_b}", world.alice)
    assert into_b.status_code == missing.status_code == 404
    assert into_b.json()["code"] == missing.json()["code"] == "unknown_site"
    # Even with a UID or URL that would be refused: nothing of site B is told.
    bad = _pull(admin, world.series_b, world.site_b, world.alice, series_uid="1.2?x=")
    assert bad.status_code == 404 and bad.json()["code"] == "unknown_site"


BAD_UIDS = [
    "",
    "1..2",
    "01.2",
    "1.02",
    ".1.2",
    "1.2.",
    "1.2a",
    "1.2 3",
    "1.2\n",
    "1" * 65,
    "1." + "2" * 63,
    "../1.2",
    "1.2/../../../instances",
    "1.2%2F..",
    "1.2?x=",
    "1.2#x",
    "1.2&expand=1",
    "1.2;x",
    "http://evil.example/1.2",
    "\u0661.2",  # an Arabic-Indic digit: a digit to str.isdigit, not to DICOM
]


@pytest.mark.parametrize("field", ["study_uid", "series_uid"])
@pytest.mark.parametrize("uid", BAD_UIDS, ids=[repr(u)[:24] for u in BAD_UIDS])
def test_a_uid_that_is_not_a_dicom_uid_is_refused_before_any_url_is_built(admin, world, field, uid):
    r = _pull(admin, world.series_a, world.site_a, world.alice, **{field: uid})
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "bad_uid"


def test_a_64_character_uid_is_a_uid(admin, world):
    longest = "1." + "2" * 62
    r = _pull(admin, world.series_a, world.site_a, world.alice, series_uid=longest)
    assert r.status_code == 422 and r.json()["code"] == "dicomweb", r.text  # asked; not there


def test_admins_add_list_and_remove_a_sites_sources_and_each_change_is_audited(admin, world):
    path = f"/v1/sites/{world.site_a}/dicomweb-sources"
    spelled = world.series_b.pacs.replace("http://", "HTTP://") + "/"
    added = admin.post(path, json={"url": spelled})
    assert added.status_code == 201, added.text
    assert added.json()["base_url"] == world.series_b.pacs  # normal form
    assert admin.post(path, json={"url": world.series_b.pacs}).status_code == 409
    listed = {(x["base_url"], x["origin"]) for x in admin.get(path).json()}
    assert listed == {(world.series_a.pacs, "settings"), (world.series_b.pacs, "admin")}
    # Now B's PACS serves A too.
    r = _pull(admin, world.series_b, world.site_a, world.alice, volume_id=f"y-{world.site_a}")
    assert r.status_code == 201, r.text

    gone = admin.delete(path, params={"url": world.series_b.pacs})
    assert gone.status_code == 204
    assert admin.delete(path, params={"url": world.series_b.pacs}).status_code == 404
    r = _pull(admin, world.series_b, world.site_a, world.alice)
    assert r.status_code == 403 and r.json()["code"] == "source_not_allowed"
    from_settings = admin.delete(path, params={"url": world.series_a.pacs})
    assert from_settings.status_code == 409 and from_settings.json()["code"] == "in_settings"

    trail = admin.get("/v1/audit", params={"resource": world.series_b.pacs}).json()
    actions = [(e["action"], e["site_id"]) for e in trail if e["site_id"] == world.site_a]
    assert actions == [
        ("dicomweb_source.remove", world.site_a),
        ("dicomweb_source.add", world.site_a),
    ]


def test_only_admins_manage_sources_and_only_sane_urls_are_kept(admin, world):
    path = f"/v1/sites/{world.site_a}/dicomweb-sources"
    for call in (
        lambda: admin.get(path, headers=world.alice),
        lambda: admin.post(path, json={"url": "http://pacs.example/dw"}, headers=world.alice),
        lambda: admin.delete(path, params={"url": world.series_a.pacs}, headers=world.alice),
    ):
        r = call()
        assert r.status_code == 403 and r.json()["code"] == "forbidden"
    nowhere = admin.post(
        f"/v1/sites/nowhere-{world.site_a}/dicomweb-sources", json={"url": "http://p/x"}
    )
    assert nowhere.status_code == 404 and nowhere.json()["code"] == "unknown_site"
    for url in (
        "ftp://pacs.example/dicom-web",
        "http://user:secret@pacs.example/dicom-web",
        "http://pacs.example/dicom-web?redirect=http://evil",
        "http://pacs.example/a/../dicom-web",
        "http://pacs.example/%64icom-web",
        "http://pacs.example:99999/dicom-web",
        "pacs.example/dicom-web",
    ):
        r = admin.post(path, json={"url": url})
        assert r.status_code == 422 and r.json()["code"] == "bad_source_url", url


def test_the_command_line_adds_lists_and_removes_a_sites_pacs(served, admin, admin_headers, world):
    token = admin_headers["Authorization"].removeprefix("Bearer ")
    cli = [sys.executable, "-m", "ctloop.cli", "admin", "--api", served, "--token", token, "pacs"]

    def ctloop(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*cli, *args], capture_output=True, text=True, timeout=120)

    added = ctloop("add", world.site_b, "HTTP://pacs.example:80/dicom-web/")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["base_url"] == "http://pacs.example/dicom-web"
    listed = ctloop("list", world.site_b)
    assert listed.returncode == 0, listed.stderr
    assert {x["base_url"] for x in json.loads(listed.stdout)} == {
        world.series_b.pacs,
        "http://pacs.example/dicom-web",
    }
    assert ctloop("remove", world.site_b, "http://pacs.example/dicom-web").returncode == 0
    again = ctloop("remove", world.site_b, "http://pacs.example/dicom-web")
    assert again.returncode == 1 and "404" in again.stderr
    assert ctloop("add", world.site_b).returncode != 0  # add needs a URL
    trail = admin.get("/v1/audit", params={"resource": "http://pacs.example/dicom-web"}).json()
    assert [(e["action"], e["site_id"]) for e in trail] == [
        ("dicomweb_source.remove", world.site_b),
        ("dicomweb_source.add", world.site_b),
    ]

"""The web workbench in real browsers (Debian's Chromium driven by Playwright, Debian's Firefox
ESR driven by Selenium and geckodriver) against the four services as processes on the real
stack:

an annotator signs in with a token, takes the next task from the queue, paints a correction on
one organ (and undoes a second stroke), accepts the other organs and submits. Through the API the
new revision is then exactly the pre-annotation plus the painted voxels, with the organs'
statuses as clicked and the minutes spent. Screenshots of the viewer and the dashboard are kept
in ``test-artifacts/`` (one pair per browser).

And an annotator of a hospital that runs Keycloak signs in there (authorization code + PKCE, a
real Keycloak with the hospital's realm): back in the page with a token that names her role and
sites, she keeps working after it expired (the page renews it) and her revision is hers.
"""

from __future__ import annotations

import gzip
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.organs import FOREGROUND, ORGAN_IDS
from ctloop.core.phantom import generate_phantom
from ctloop.platform import until
from ctloop.settings import REPO_ROOT
from tests.helpers.browsers import Page, missing, open_page
from tests.helpers.keycloak import User, run_keycloak
from tests.helpers.platform import run_platform

PORTS = {"INGEST": 28960, "INFERENCE": 28962, "TRAINING": 28964, "METRICS": 28966}
KEYCLOAK_PORT = 28970
KC_SITE = "kc-site"
ALICE = User("alice", "alice-pw", "annotator", (KC_SITE,))
ACCESS_TOKEN_S = 10  # short, so the page has to renew it during the test
ARTIFACTS = REPO_ROOT / "test-artifacts"
PAINTED = "spleen"


def _nifti(raw: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(raw)).dataobj, dtype=np.uint8)


def _upload(client: httpx.Client, vid: str, site: str, dataset: str, seed: int) -> None:
    p = generate_phantom("public" if dataset == "public" else "clinical-a", seed, "tiny")
    files = {"file": ("ct.nii.gz", nifti_gz_bytes(p.image, p.affine), "application/gzip")}
    if dataset == "public":
        files["label"] = ("label.nii.gz", nifti_gz_bytes(p.label, p.affine), "application/gzip")
    r = client.post(
        "/v1/volumes", files=files, data={"site_id": site, "dataset": dataset, "volume_id": vid}
    )
    assert r.status_code == 201, r.text


def _disc(radius: float, row_mm: float, col_mm: float) -> list[tuple[int, int]]:
    """The brush's footprint, as the page computes it (volume.js brushOffsets)."""
    m = min(row_mm, col_mm)
    ry, rx = row_mm / m, col_mm / m
    r = int(np.ceil(radius))
    return [
        (dr, dc)
        for dr in range(-r, r + 1)
        for dc in range(-r, r + 1)
        if (dr * ry) ** 2 + (dc * rx) ** 2 <= radius * radius
    ]


def _voxel(view: dict, dims: list[int], index: int, row: int, col: int) -> tuple[int, int, int]:
    """The voxel that display pixel (row, col) of plane ``index`` shows (volume.js PlaneMap)."""
    v = [0, 0, 0]
    v[view["axis"]] = index
    v[view["rows"]] = dims[view["rows"]] - 1 - row if view["flip_rows"] else row
    v[view["cols"]] = dims[view["cols"]] - 1 - col if view["flip_cols"] else col
    return v[0], v[1], v[2]


@pytest.fixture(scope="module")
def keycloak(tmp_path_factory):
    api = f"http://127.0.0.1:{PORTS['INGEST']}"
    log = tmp_path_factory.mktemp("keycloak") / "keycloak.log"
    with run_keycloak(KEYCLOAK_PORT, [ALICE], log, api, access_token_s=ACCESS_TOKEN_S) as kc:
        yield kc


@pytest.fixture(scope="module")
def platform(tmp_path_factory, keycloak):
    """The platform, signing in at the test Keycloak too, with a serving igniter."""
    oidc = {
        "CTLOOP_AUTH__OIDC_ISSUER": keycloak.issuer,
        "CTLOOP_AUTH__OIDC_CLIENT_ID": keycloak.client_id,
    }
    with run_platform(tmp_path_factory.mktemp("platform"), PORTS, oidc) as running:
        admin = _admin(running)
        for i in range(3):
            _upload(admin, f"pub{i}-{running['tag']}", "public-site", "public", seed=300 + i)
        yield running


def _admin(platform) -> httpx.Client:
    return httpx.Client(
        base_url=platform["api"],
        timeout=60,
        headers={"Authorization": f"Bearer {platform['admin_token']}"},
    )


def _clinical(platform, site: str, names: list[str]) -> list[str]:
    """Clinical volumes uploaded to ``site``, once the igniter has pre-annotated them."""
    admin = _admin(platform)
    r = admin.post("/v1/sites", json={"id": site})
    assert r.status_code in (201, 409), r.text
    vids = [f"{n}-{platform['tag']}" for n in names]
    for i, vid in enumerate(vids):
        _upload(admin, vid, site, "clinical", seed=400 + i)

    def pre_annotated() -> bool:
        return all(admin.get(f"/v1/volumes/{v}/prediction").status_code == 200 for v in vids)

    until("the igniter's pre-annotations", pre_annotated, 300, platform["logs"])
    return vids


@dataclass(frozen=True)
class _Stroke:
    """Where the brush painted: its radius, the axial plane (view, shape, index) and the row and
    first column of the stroke in display pixels."""

    radius: int
    axial: dict
    dims: list[int]
    index: int
    row: int
    col: int


def _annotator(platform, browser: str) -> tuple[str, list[str], str, str, httpx.Client]:
    """A site of her own with two pre-annotated clinical volumes, and an annotator there:
    (site, volume ids, user, token, her API client)."""
    tag, api = platform["tag"], platform["api"]
    admin = _admin(platform)
    site = f"hosp-{browser}-{tag}"
    clinical = _clinical(platform, site, [f"cli{i}-{browser}" for i in range(2)])
    user = f"ann-{browser}-{tag}"
    r = admin.post("/v1/users", json={"id": user, "role": "annotator", "sites": [site]})
    assert r.status_code == 201, r.text
    token = admin.post(f"/v1/users/{user}/tokens", json={"label": "browser"}).json()["token"]
    me = httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {token}"})
    return site, clinical, user, token, me


def _signs_in(page: Page, token: str, site: str, clinical: list[str]) -> None:
    """Sign in with the token; the task list shows the annotator's site."""
    page.fill("#token", token)
    page.click("#signin-form button[type=submit]")
    page.wait_for("#tasks:not([hidden])")
    assert site in page.text("#sites")
    assert all(v in page.text("#waiting") for v in clinical)


def _takes_next_task(page: Page, me: httpx.Client, clinical: list[str], user: str):
    """Next task: a lease from the queue, the volume open in three views; (volume id, its
    viewer metadata, its pre-annotation)."""
    page.click("#next-task")
    page.wait_for("#workbench:not([hidden])")
    page.wait_for("#view-axial .caption:not(:empty)")
    vid = page.evaluate("ctloopWorkbench.task.volumeId")
    assert vid in clinical
    meta = me.get(f"/v1/volumes/{vid}/viewer").json()
    assert meta["lease_holder"] == user
    pre = _nifti(me.get(f"/v1/volumes/{vid}/prediction/mask").content)
    return vid, meta, pre


def _paints_and_undoes(page: Page, meta: dict) -> _Stroke:
    """The spleen, brush one step larger than the default (3 -> 4), on the middle axial plane:
    one stroke kept, a second dab undone."""
    page.press(str(FOREGROUND.index(PAINTED) + 1))
    page.press("]")
    radius = int(page.value("#brush-size"))
    assert radius == 4
    axial = meta["views"]["axial"]
    dims = meta["shape"]
    index = page.evaluate("ctloopWorkbench.views[0].index")
    n_rows, n_cols = dims[axial["rows"]], dims[axial["cols"]]
    row, col = n_rows // 2, n_cols // 2 - 6

    def at(r: int, c: int) -> dict[str, float]:
        return dict(page.evaluate(f"ctloopWorkbench.views[0].clientPoint({r}, {c})"))

    # A stroke of four brush positions along one row ...
    page.drag([at(row, col), at(row, col + 3)])
    # ... and a second dab elsewhere, undone with Ctrl+Z (redo and undo again on the way).
    page.click_at(at(row - 12, col + 12))
    page.press("Control+z")
    page.press("Control+y")
    page.press("Control+z")
    return _Stroke(radius, axial, dims, index, row, col)


def _accepts_the_rest_and_submits(page: Page, browser: str, vid: str) -> Path:
    """Accept every other organ with its own button; the painted one became "corrected"."""
    for organ in FOREGROUND:
        if organ != PAINTED:
            page.click(f'#organs tr[data-organ="{organ}"] button[data-status="accepted"]')
    time.sleep(1.2)  # let the timer count a second of work
    viewer_png = ARTIFACTS / f"workbench-viewer-{browser}.png"
    page.screenshot(viewer_png)

    page.click("#submit")
    page.wait_for("body[data-submitted]")
    assert page.attribute("body", "data-submitted") == f"{vid}:1"
    return viewer_png


def _dashboard_shows_the_site(page: Page, api: str, site: str, browser: str) -> Path:
    page.goto(f"{api}/ui/dashboard.html")
    page.wait_for("body[data-loaded]")
    assert site in page.text("#queues")
    dashboard_png = ARTIFACTS / f"workbench-dashboard-{browser}.png"
    page.screenshot(dashboard_png, full_page=True)
    return dashboard_png


def _revision_as_clicked(me: httpx.Client, vid: str, user: str) -> None:
    """Through the API: one revision, statuses as clicked, minutes spent."""
    (rev,) = me.get(f"/v1/volumes/{vid}/annotations").json()
    assert rev["author"] == user and rev["revision"] == 1
    assert rev["organs"] == {o: ("corrected" if o == PAINTED else "accepted") for o in FOREGROUND}
    assert rev["reviewed_slices"] is None and 0 < rev["minutes"] < 10


def _mask_is_pre_plus_painted(me: httpx.Client, vid: str, pre: np.ndarray, s: _Stroke) -> None:
    """The mask is the pre-annotation plus exactly the painted voxels; the lease was released."""
    n_rows, n_cols = s.dims[s.axial["rows"]], s.dims[s.axial["cols"]]
    expected = pre.copy()
    for c in range(s.col, s.col + 4):
        for dr, dc in _disc(s.radius, s.axial["row_mm"], s.axial["col_mm"]):
            r2, c2 = s.row + dr, c + dc
            if 0 <= r2 < n_rows and 0 <= c2 < n_cols:
                expected[_voxel(s.axial, s.dims, s.index, r2, c2)] = ORGAN_IDS[PAINTED]
    got = me.get("/datastore/label", params={"label": vid, "tag": "final"})
    assert got.status_code == 200, got.text
    mask = _nifti(got.content)
    changed = int((expected != pre).sum())
    assert changed > 0
    assert np.array_equal(mask, expected), f"{int((mask != expected).sum())} voxels differ"
    assert me.get("/v1/workbench/tasks").json()["mine"] == []  # the lease was released


@pytest.mark.parametrize("browser", ["chromium", "firefox"])
def test_annotator_corrects_a_task_in_the_browser(platform, browser):
    if why := missing(browser):
        pytest.fail(f"{browser}: {why}")
    api = platform["api"]
    site, clinical, user, token, me = _annotator(platform, browser)
    ARTIFACTS.mkdir(exist_ok=True)

    with open_page(browser) as page:
        page.goto(f"{api}/ui/")
        _signs_in(page, token, site, clinical)
        vid, meta, pre = _takes_next_task(page, me, clinical, user)
        stroke = _paints_and_undoes(page, meta)
        viewer_png = _accepts_the_rest_and_submits(page, browser, vid)
        dashboard_png = _dashboard_shows_the_site(page, api, site, browser)
        errors = page.errors()
    assert not errors, errors
    print(f"screenshots: {viewer_png} {dashboard_png}")

    _revision_as_clicked(me, vid, user)
    _mask_is_pre_plus_painted(me, vid, pre, stroke)


@pytest.mark.parametrize("browser", ["chromium", "firefox"])
def test_annotator_signs_in_at_the_hospitals_keycloak(platform, keycloak, browser):
    if why := missing(browser):
        pytest.fail(f"{browser}: {why}")
    (vid,) = _clinical(platform, KC_SITE, [f"kc-{browser}"])
    admin = _admin(platform)
    with open_page(browser) as page:
        page.goto(f"{platform['api']}/ui/")
        page.wait_for("#sso-box:not([hidden])")
        assert "127.0.0.1" in page.text("#sso")
        page.click("#sso")

        # Keycloak's own login page; then back in the workbench with the code exchanged.
        page.wait_for("#username")
        page.fill("#username", ALICE.name)
        page.fill("#password", ALICE.password)
        page.click("#kc-login")
        page.wait_for("#tasks:not([hidden])")
        assert page.evaluate("location.search") == ""  # the one-time code left the address
        assert page.text("#who") == "alice (annotator)"
        assert KC_SITE in page.text("#sites") and vid in page.text("#waiting")

        # The access token runs out; the next request renews it and goes through.
        first = page.evaluate("sessionStorage.getItem('ctloop.token')")
        time.sleep(ACCESS_TOKEN_S + 2)
        page.click("#refresh-tasks")
        until(
            "a renewed token",
            lambda: page.evaluate("sessionStorage.getItem('ctloop.token')") != first,
            30,
            platform["logs"],
        )
        assert page.text("#signin-error") == ""

        # Her task and her revision: accept every organ, submit.
        page.click("#next-task")
        page.wait_for("#workbench:not([hidden])")
        task = page.evaluate("ctloopWorkbench.task.volumeId")
        # rows keep the user's sub (stable across renames), the page shows the name
        alice_id = keycloak.user_id(ALICE.name)
        assert admin.get(f"/v1/volumes/{task}/viewer").json()["lease_holder"] == alice_id
        page.click("#accept-rest")
        page.click("#submit")
        page.wait_for("body[data-submitted]")
        errors = page.errors()
    assert not errors, errors
    (rev,) = admin.get(f"/v1/volumes/{task}/annotations").json()
    assert rev["author"] == alice_id
    assert set(rev["organs"].values()) == {"accepted"}

"""The web workbench in a real browser (headless Chromium, Debian's package, driven by
Playwright) against the four services as processes on the real stack:

an annotator signs in with a token, takes the next task from the queue, paints a correction on
one organ (and undoes a second stroke), accepts the other organs and submits. Through the API the
new revision is then exactly the pre-annotation plus the painted voxels, with the organs'
statuses as clicked and the minutes spent. Screenshots of the viewer and the dashboard are kept
in ``test-artifacts/``.
"""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import pytest

from ctloop.core.datasets import nifti_gz_bytes
from ctloop.core.organs import FOREGROUND, ORGAN_IDS
from ctloop.core.phantom import generate_phantom
from ctloop.settings import REPO_ROOT
from tests.integration.platform import run_platform, until

PORTS = {"INGEST": 28960, "INFERENCE": 28962, "TRAINING": 28964, "METRICS": 28966}
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
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


@pytest.fixture
def platform(tmp_path: Path):
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed: run `make setup` (target browser)")
    with run_platform(tmp_path, PORTS) as running:
        yield running


def test_annotator_corrects_a_task_in_the_browser(platform):
    from playwright.sync_api import sync_playwright

    tag, logs, api = platform["tag"], platform["logs"], platform["api"]
    admin = httpx.Client(
        base_url=api, timeout=60, headers={"Authorization": f"Bearer {platform['admin_token']}"}
    )
    site = f"hosp-{tag}"
    for i in range(3):
        _upload(admin, f"pub{i}-{tag}", "public-site", "public", seed=300 + i)
    clinical = [f"cli{i}-{tag}" for i in range(2)]
    for i, vid in enumerate(clinical):
        _upload(admin, vid, site, "clinical", seed=400 + i)

    def pre_annotated() -> bool:
        return all(admin.get(f"/v1/volumes/{v}/prediction").status_code == 200 for v in clinical)

    until("the igniter's pre-annotations", pre_annotated, 300, logs)
    r = admin.post("/v1/users", json={"id": f"ann-{tag}", "role": "annotator", "sites": [site]})
    assert r.status_code == 201, r.text
    token = admin.post(f"/v1/users/ann-{tag}/tokens", json={"label": "browser"}).json()["token"]
    me = httpx.Client(base_url=api, timeout=60, headers={"Authorization": f"Bearer {token}"})
    ARTIFACTS.mkdir(exist_ok=True)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{api}/ui/")

        # Sign in with the token; the task list shows the annotator's site.
        page.fill("#token", token)
        page.click("#signin-form button[type=submit]")
        page.wait_for_selector("#tasks:not([hidden])")
        assert site in page.inner_text("#sites")
        assert all(v in page.inner_text("#waiting") for v in clinical)

        # Next task: a lease from the queue, the volume open in three views.
        page.click("#next-task")
        page.wait_for_selector("#workbench:not([hidden])")
        # (no wait_for_function: it evaluates strings, which the page's CSP forbids)
        page.wait_for_selector("#view-axial .caption:not(:empty)")
        vid = page.evaluate("ctloopWorkbench.task.volumeId")
        assert vid in clinical
        meta = me.get(f"/v1/volumes/{vid}/viewer").json()
        assert meta["lease_holder"] == f"ann-{tag}"
        pre = _nifti(me.get(f"/v1/volumes/{vid}/prediction/mask").content)

        # The spleen, brush one step larger than the default (3 -> 4), on the middle axial plane.
        page.keyboard.press(str(FOREGROUND.index(PAINTED) + 1))
        page.keyboard.press("]")
        radius = int(page.input_value("#brush-size"))
        assert radius == 4
        axial = meta["views"]["axial"]
        dims = meta["shape"]
        index = page.evaluate("ctloopWorkbench.views[0].index")
        n_rows, n_cols = dims[axial["rows"]], dims[axial["cols"]]
        row, col = n_rows // 2, n_cols // 2 - 6

        def at(r: int, c: int) -> dict[str, float]:
            return page.evaluate(f"ctloopWorkbench.views[0].clientPoint({r}, {c})")

        # A stroke of four brush positions along one row ...
        start, end = at(row, col), at(row, col + 3)
        page.mouse.move(start["x"], start["y"])
        page.mouse.down()
        page.mouse.move(end["x"], end["y"], steps=6)
        page.mouse.up()
        # ... and a second dab elsewhere, undone with Ctrl+Z (redo and undo again on the way).
        extra = at(row - 12, col + 12)
        page.mouse.click(extra["x"], extra["y"])
        page.keyboard.press("Control+z")
        page.keyboard.press("Control+y")
        page.keyboard.press("Control+z")

        # Accept every other organ with its own button; the painted one became "corrected".
        for organ in FOREGROUND:
            if organ != PAINTED:
                page.click(f'#organs tr[data-organ="{organ}"] button[data-status="accepted"]')
        page.wait_for_timeout(1200)  # let the timer count a second of work
        viewer_png = ARTIFACTS / "workbench-viewer.png"
        page.screenshot(path=str(viewer_png))

        page.click("#submit")
        page.wait_for_selector("body[data-submitted]")
        assert page.get_attribute("body", "data-submitted") == f"{vid}:1"

        page.goto(f"{api}/ui/dashboard.html")
        page.wait_for_selector("body[data-loaded]")
        assert site in page.inner_text("#queues")
        dashboard_png = ARTIFACTS / "workbench-dashboard.png"
        page.screenshot(path=str(dashboard_png), full_page=True)
        browser.close()
    assert not errors, errors
    print(f"screenshots: {viewer_png} {dashboard_png}")

    # Through the API: one revision, statuses as clicked, minutes spent ...
    (rev,) = me.get(f"/v1/volumes/{vid}/annotations").json()
    assert rev["author"] == f"ann-{tag}" and rev["revision"] == 1
    assert rev["organs"] == {o: ("corrected" if o == PAINTED else "accepted") for o in FOREGROUND}
    assert rev["reviewed_slices"] is None and 0 < rev["minutes"] < 10
    # ... and the mask is the pre-annotation plus exactly the painted voxels.
    expected = pre.copy()
    for c in range(col, col + 4):
        for dr, dc in _disc(radius, axial["row_mm"], axial["col_mm"]):
            r2, c2 = row + dr, c + dc
            if 0 <= r2 < n_rows and 0 <= c2 < n_cols:
                expected[_voxel(axial, dims, index, r2, c2)] = ORGAN_IDS[PAINTED]
    got = me.get("/datastore/label", params={"label": vid, "tag": "final"})
    assert got.status_code == 200, got.text
    mask = _nifti(got.content)
    changed = int((expected != pre).sum())
    assert changed > 0
    assert np.array_equal(mask, expected), f"{int((mask != expected).sum())} voxels differ"
    assert me.get("/v1/workbench/tasks").json()["mine"] == []  # the lease was released

"""List endpoints page with limits (issue 18, finding 9): ``limit`` is bounded, the body is still
the plain list, the next page is named in ``X-Next-Cursor`` / ``Link``, and following the pages
gives every item exactly once, even when items are added while a client pages."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from ctloop.paging import DEFAULT_LIMIT, MAX_LIMIT, NEXT_CURSOR
from services.ingest.app import create_app
from tests.helpers.volumes import nifti, phantom


@pytest.fixture(scope="module")
def api(svc_settings, admin_headers):
    with TestClient(create_app(svc_settings), headers=admin_headers) as client:
        yield client


def _all_pages(api, path: str, limit: int, **params) -> tuple[list, int]:
    """Every item of a list, following its cursors; and how many pages it took."""
    items, pages, cursor = [], 0, None
    while True:
        r = api.get(
            path, params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
        )
        assert r.status_code == 200, r.text
        assert len(r.json()) <= limit
        items += r.json()
        pages += 1
        cursor = r.headers.get(NEXT_CURSOR)
        if cursor is None:
            assert "link" not in r.headers
            return items, pages
        assert r.headers["link"].endswith('rel="next"') and f"cursor={cursor}" in r.headers["link"]


def test_sites_and_the_audit_log_page_with_every_item_once(api, unique):
    made = [f"pg-{unique}-{n}" for n in range(7)]
    for site in made[:5]:
        assert api.post("/v1/sites", json={"id": site}).status_code == 201
    first = api.get("/v1/sites", params={"limit": 2})
    assert len(first.json()) == 2 and NEXT_CURSOR in first.headers
    # Sites made after the first page was read come once, in their place, on a later page.
    for site in made[5:]:
        assert api.post("/v1/sites", json={"id": site}).status_code == 201
    sites, pages = _all_pages(api, "/v1/sites", 2)
    ids = [s["id"] for s in sites]
    assert len(ids) == len(set(ids)) and set(made) <= set(ids) and ids == sorted(ids)
    assert pages == -(-len(ids) // 2)

    trail, _ = _all_pages(api, "/v1/audit", 3)
    created = [e["resource"] for e in trail if e["action"] == "site.create"]
    assert [r for r in created if r.startswith(f"pg-{unique}")] == made[::-1]  # newest first
    assert len({(e["at"], e["resource"], e["action"]) for e in trail}) == len(trail)


def test_volumes_and_annotations_page_with_every_item_once(api, unique):
    p = phantom(seed=71)
    vids = [f"pgv-{unique}-{n}" for n in range(5)]
    for vid in vids:
        files = {"file": ("ct.nii.gz", nifti(p.image + len(vid), p.affine), "application/gzip")}
        form = {"site_id": "site-a", "dataset": "clinical", "volume_id": vid}
        assert api.post("/v1/volumes", data=form, files=files).status_code == 201, vid
    listed, pages = _all_pages(api, "/v1/volumes", 2, site_id="site-a")
    ours = [v["volume_id"] for v in listed if v["volume_id"].startswith(f"pgv-{unique}")]
    assert ours == vids and pages >= 3  # oldest first, each once
    assert len({v["volume_id"] for v in listed}) == len(listed)

    form = {"minutes": "2", "organs": "{}"}
    for _ in range(3):
        files = {"mask": ("m.nii.gz", nifti(p.label, p.affine), "application/gzip")}
        assert api.post(f"/v1/volumes/{vids[0]}/annotations", data=form, files=files).is_success
    revisions, pages = _all_pages(api, f"/v1/volumes/{vids[0]}/annotations", 2)
    assert [r["revision"] for r in revisions] == [1, 2, 3] and pages == 2


def test_limits_are_enforced_and_cursors_checked(api):
    assert api.get("/v1/sites", params={"limit": MAX_LIMIT + 1}).status_code == 422
    assert api.get("/v1/audit", params={"limit": 0}).status_code == 422
    assert len(api.get("/v1/audit").json()) <= DEFAULT_LIMIT
    for cursor in ("not-base64!", "bnVsbA", "WyJhIiwgImIiXQ", "W3siYSI6IDF9XQ"):
        r = api.get("/v1/volumes", params={"cursor": cursor})
        assert r.status_code == 422 and r.json()["code"] == "invalid_request", cursor

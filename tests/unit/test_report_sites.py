"""report.md names the site profiles a phantom run drew from (report.json has them in full)."""

from __future__ import annotations

from ctloop.transfer.sites import RunSites
from services.metrics.report import _sites_line


def test_the_sites_and_seed_of_a_phantom_run_are_named():
    sites = RunSites.resolve(None, ["clinical-b", "examples/sites/clinical-d.json"], None)
    line = _sites_line({"seed": 2, "sites": sites.describe()})
    assert line[1] == (
        "Sites: public `public`; hospital-a `clinical-b`, hospital-b `clinical-d`; "
        "evaluation `clinical-b`; seed 2."
    )


def test_a_run_on_the_users_folders_has_no_sites_line():
    assert _sites_line({"seed": 0, "sites": "folders"}) == []
    assert _sites_line({}) == []

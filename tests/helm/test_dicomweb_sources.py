"""The chart's ``ingest.dicomwebSources``: each site its own PACS, reaching ingest's settings in
normal form; the old global list still read (as every site's), anything but http(s) refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helm.conftest import helm_template, render
from tests.helm.test_settings_and_secrets import service_container, settings_of


def _values(tmp_path: Path, sources: object) -> Path:
    f = tmp_path / "values.yaml"
    f.write_text(yaml.safe_dump({"ingest": {"dicomwebSources": sources}}))
    return f


def test_each_site_gets_its_own_pacs_in_normal_form(tmp_path):
    sources = {
        "site-a": ["HTTPS://PACS-A.example:443/dicom-web/"],
        "site-b": ["http://pacs-b.example:8042/dicom-web"],
    }
    ingest = settings_of(service_container(render(_values(tmp_path, sources)), "ingest"))
    assert ingest.services.dicomweb_sources == {
        "site-a": ["https://pacs-a.example/dicom-web"],
        "site-b": ["http://pacs-b.example:8042/dicom-web"],
    }
    default = settings_of(service_container(render(), "ingest"))
    assert default.services.dicomweb_sources == {}


def test_the_old_global_list_means_every_site_and_says_it_is_deprecated(tmp_path):
    docs = render(_values(tmp_path, ["https://pacs.example/dicom-web"]))
    with pytest.warns(DeprecationWarning, match="mapping of site id"):
        ingest = settings_of(service_container(docs, "ingest"))
    assert ingest.services.dicomweb_sources == {"*": ["https://pacs.example/dicom-web"]}


def test_a_source_that_is_not_http_is_refused_by_the_chart(tmp_path):
    for sources in ({"site-a": ["file:///etc/passwd"]}, ["gopher://pacs.example/dicom-web"]):
        result = helm_template("-f", str(_values(tmp_path, sources)))
        assert result.returncode != 0, sources
        assert "dicomwebSources" in result.stderr

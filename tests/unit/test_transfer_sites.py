"""Which site profile each part of a transfer run's phantoms comes from."""

import json

import numpy as np
import pytest

from ctloop.core.phantom import SITES, InvalidSiteProfile, SiteError, generate_phantom
from ctloop.transfer.presets import PRESETS
from ctloop.transfer.sites import RunSites
from ctloop.transfer.volumes import synthetic_volumes


def test_by_default_both_hospitals_and_the_evaluation_are_clinical_a():
    sites = RunSites.resolve()
    assert sites.public == SITES["public"]
    assert sites.hospitals == {"hospital-a": SITES["clinical-a"], "hospital-b": SITES["clinical-a"]}
    assert sites.evaluation == SITES["clinical-a"]


def test_clinical_sites_go_to_the_hospitals_in_order_and_evaluation_follows_the_first(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"name": "mine", "phase": "delayed"}))
    sites = RunSites.resolve(clinical=[str(path), "clinical-b"])
    assert sites.hospitals["hospital-a"].name == "mine"
    assert sites.hospitals["hospital-b"] == SITES["clinical-b"]
    assert sites.evaluation.name == "mine"
    explicit = RunSites.resolve("clinical-c", ["clinical-b"], "clinical-a")
    assert (explicit.public.name, explicit.evaluation.name) == ("clinical-c", "clinical-a")
    assert sites.describe()["hospitals"]["hospital-a"]["phase"] == "delayed"


def test_more_clinical_sites_than_hospitals_or_a_bad_profile_is_refused(tmp_path):
    with pytest.raises(SiteError, match="at most 2"):
        RunSites.resolve(clinical=["clinical-a", "clinical-b", "clinical-c"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "bad", "blur_mm": -1.0}))
    with pytest.raises(InvalidSiteProfile, match="blur_mm"):
        RunSites.resolve(evaluation=str(bad))


def test_synthetic_volumes_draw_each_set_from_its_site():
    preset = PRESETS["tiny"]
    sites = RunSites.resolve("public", ["clinical-a", "clinical-b"], "clinical-c")
    data = synthetic_volumes(preset, seed=4, prefix="t-", sites=sites)
    n = preset.clinical_per_site
    assert len(data.clinical) == 2 * n and set(data.truth) == set(data.clinical)
    for i, (vid, (site, image, _)) in enumerate(data.clinical.items()):
        profile = SITES["clinical-a" if i < n else "clinical-b"]
        assert site == ("hospital-a" if i < n else "hospital-b")
        want = generate_phantom(profile, 4 + 10_000 + i, preset.size)
        assert np.array_equal(image, want.image) and np.array_equal(data.truth[vid], want.label)
    image, _, label = data.evaluation["t-eval-000"]
    want = generate_phantom("clinical-c", 4 + 20_000, preset.size)
    assert np.array_equal(image, want.image) and np.array_equal(label, want.label)
    _, _, label = data.public["t-pub-001"]
    assert np.array_equal(label, generate_phantom("public", 5, preset.size).label)
    # the public test set (forgetting): the public site, its own seeds, no training patient
    assert list(data.public_test) == [f"t-ptest-{i:03d}" for i in range(preset.n_public_test)]
    image, _, label = data.public_test["t-ptest-000"]
    want = generate_phantom("public", 4 + 30_000, preset.size)
    assert np.array_equal(image, want.image) and np.array_equal(label, want.label)
    assert not any(np.array_equal(image, img) for img, _, _ in data.public.values())

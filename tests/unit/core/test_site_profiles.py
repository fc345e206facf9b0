"""Site profiles: the whole name seeds the patients; a profile file is checked field by field."""

import json
from pathlib import Path

import numpy as np
import pytest

from ctloop.core.phantom import (
    SITES,
    InvalidSiteProfile,
    SiteProfile,
    UnknownSite,
    generate_phantom,
    load_site,
)

EXAMPLE = Path(__file__).parents[3] / "examples" / "sites" / "clinical-d.json"


def _renamed(name: str) -> SiteProfile:
    return SITES["clinical-a"].model_copy(update={"name": name})


def test_sites_differing_after_the_eighth_byte_have_other_patients():
    # "clinical" is 8 bytes: a hash of the first 8 gave every clinical site the same patients.
    a = generate_phantom(_renamed("clinical-x"), 3, "tiny")
    b = generate_phantom(_renamed("clinical-y"), 3, "tiny")
    assert not np.array_equal(a.label, b.label)
    assert a.spacing != b.spacing  # the field of view is drawn from the seed too


def test_the_same_site_and_seed_give_the_same_patient():
    a = generate_phantom(_renamed("clinical-x"), 3, "tiny")
    b = generate_phantom(_renamed("clinical-x"), 3, "tiny")
    assert np.array_equal(a.label, b.label) and np.array_equal(a.image, b.image)


def _invalid(tmp_path, content: str) -> str:
    path = tmp_path / "site.json"
    path.write_text(content)
    with pytest.raises(InvalidSiteProfile) as err:
        load_site(str(path))
    assert str(path) in str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"noise_hu": 10.0, "noise": 3.0}, "noise: unknown field"),
        ({"noise_hu": "12"}, "noise_hu: Input should be a valid number"),
        ({"noise_hu": -1.0}, "noise_hu: Input should be greater than or equal to 0"),
        ({"slice_spacing_mm": 0.0}, "slice_spacing_mm: Input should be greater than"),
        ({"fov_mm": [400.0, 300.0]}, "fov_mm: Value error, needs [low, high]"),
        ({"fov_mm": [50.0, 300.0]}, "fov_mm.0: Input should be greater than"),
        ({"patient_scale": [1.0]}, "patient_scale"),
        ({"hu_offsets": {"livr": 20.0}}, "hu_offsets: Value error, unknown tissue ['livr']"),
        ({"hu_offsets": {"liver": 900.0}}, "hu_offsets.liver: Input should be less than"),
        ({"phase": "venous"}, "phase: Input should be"),
        ({"name": "../etc"}, "name: String should match pattern"),
    ],
)
def test_a_bad_profile_is_refused_naming_the_field(tmp_path, fields, named):
    message = _invalid(tmp_path, json.dumps({"name": "mysite"} | fields))
    assert named in message


def test_a_profile_needs_a_name_and_valid_json(tmp_path):
    assert "name: Field required" in _invalid(tmp_path, json.dumps({"noise_hu": 5.0}))
    assert "-: Invalid JSON" in _invalid(tmp_path, "{noise_hu: 5}")


def test_a_missing_profile_file_or_unknown_name_is_an_unknown_site(tmp_path):
    with pytest.raises(UnknownSite, match="cannot be read"):
        load_site(str(tmp_path / "absent.json"))
    with pytest.raises(UnknownSite, match="unknown site 'clinical-z'"):
        load_site("clinical-z")


def test_the_example_clinical_site_is_valid_and_new():
    profile = load_site(str(EXAMPLE))
    assert profile.name not in SITES
    assert all(profile.model_dump() != p.model_dump() for p in SITES.values())
    p = generate_phantom(profile, 0, "tiny")
    assert p.site == "clinical-d" and p.label.any()

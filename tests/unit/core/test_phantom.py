import json

import numpy as np
import pytest
from scipy import ndimage

from ctloop.core.datasets import DecathlonDataset, synthesize_dataset
from ctloop.core.organs import ORGAN_IDS
from ctloop.core.phantom import (
    PHASE_HU,
    SITES,
    SiteProfile,
    UnknownSite,
    generate_phantom,
    load_site,
)


def test_same_seed_same_volume_other_seed_other_patient():
    a = generate_phantom("public", 7, "tiny")
    b = generate_phantom("public", 7, "tiny")
    c = generate_phantom("public", 8, "tiny")
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    assert a.spacing == b.spacing
    assert not np.array_equal(a.label, c.label)


def test_every_organ_is_present_at_small_size():
    p = generate_phantom("public", 3, "small")
    present = set(np.unique(p.label))
    assert present == set(ORGAN_IDS.values())


@pytest.mark.parametrize("site", ["public", "clinical-b"])
def test_labels_line_up_with_their_hounsfield_units(site):
    p = generate_phantom(site, 1, "small")
    profile = SITES[site]
    expected = PHASE_HU[profile.phase]
    for organ, tissue in [("liver", "liver"), ("spleen", "spleen"), ("aorta", "aorta"),
                          ("kidney_left", "kidney")]:  # fmt: skip
        inside = p.label == ORGAN_IDS[organ]
        # Erode away partial-volume borders, then compare the median with the site's HU.
        core = ndimage.binary_erosion(inside, iterations=1)
        measured = float(np.median(p.image[core]))
        want = expected[tissue] * profile.intensity_scale + profile.intensity_offset
        assert abs(measured - want) < 25, (organ, measured, want)
    # Outside the body it is air.
    assert np.median(p.image[:2, :2, :]) < -900


def test_sites_shift_the_domain():
    pub = generate_phantom("public", 2, "small")
    cli = generate_phantom("clinical-a", 2, "small")
    liver = ORGAN_IDS["liver"]
    assert np.median(pub.image[pub.label == liver]) - np.median(cli.image[cli.label == liver]) > 40
    # Quantum noise: spread of HU inside the liver, away from its borders.
    noise = [
        np.std(p.image[ndimage.binary_erosion(p.label == liver, iterations=2)]) for p in (pub, cli)
    ]
    assert noise[1] > 1.8 * noise[0]
    assert cli.spacing[2] > pub.spacing[2]


def test_user_site_profile_from_json(tmp_path):
    path = tmp_path / "mysite.json"
    path.write_text(json.dumps({"name": "mysite", "phase": "arterial", "noise_hu": 5.0}))
    profile = load_site(str(path))
    assert isinstance(profile, SiteProfile) and profile.phase == "arterial"
    p = generate_phantom(profile, 0, "tiny")
    assert p.site == "mysite"
    with pytest.raises(UnknownSite):
        load_site("no-such-site")


def test_realistic_size_grid():
    p = generate_phantom("public", 0, "full", slab=16)
    assert p.image.shape[:2] == (512, 512)
    assert 230 < p.image.shape[2] < 290  # 240-280 mm at 1 mm slices
    assert p.image.dtype == np.int16


def test_written_nifti_keeps_geometry(tmp_path):
    ds = synthesize_dataset(tmp_path / "d", "clinical-a", 2, seed=5, size="tiny")
    vol = ds.load(0)
    p = generate_phantom("clinical-a", 5, "tiny")
    assert np.allclose(vol.spacing, p.spacing)
    assert np.array_equal(vol.image, p.image.astype(np.float32))
    assert np.array_equal(vol.label, p.label)
    assert isinstance(DecathlonDataset.open(tmp_path / "d"), DecathlonDataset)

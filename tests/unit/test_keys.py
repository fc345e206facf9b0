import pytest

from ctloop.contracts import keys


def test_layout():
    assert keys.volume_image("site-a", "v1") == "volumes/site-a/v1/image.nii.gz"
    assert keys.annotation_mask("site-a", "v1", 7) == "annotations/site-a/v1/rev-000007/mask.nii.gz"
    assert keys.prediction_mask("v1", "sustainer", 3) == "predictions/v1/sustainer/v3/mask.nii.gz"
    assert (
        keys.prediction_info("v1", "sustainer", 3) == "predictions/v1/sustainer/v3/prediction.json"
    )
    assert keys.model_version_prefix("models", "igniter", 2) == "models/igniter/2/"
    assert keys.model_config("models", "igniter") == "models/igniter/config.pbtxt"


@pytest.mark.parametrize("bad", ["", "../etc", "a/b", "a..b", ".hidden", "x" * 200, "sp ace", "é"])
def test_hostile_ids_are_refused(bad):
    with pytest.raises(keys.InvalidKeyPart):
        keys.volume_image("site-a", bad)


def test_model_versions_start_at_one():
    with pytest.raises(keys.InvalidKeyPart):
        keys.model_version_prefix("models", "igniter", 0)

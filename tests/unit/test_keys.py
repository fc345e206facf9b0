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


def test_model_repository_training_and_report_layout():
    assert keys.model_root("models", "igniter") == "models/igniter/"
    assert keys.model_manifest("models", "igniter", 2) == "models/igniter/2/manifest.json"
    assert keys.model_weights("models", "igniter", 2) == "models/igniter/2/weights.pt"
    assert keys.model_file("models", "igniter", 2, "model.py") == "models/igniter/2/model.py"
    assert keys.model_repository_readme("models") == "models/README.txt"
    job = keys.training_job_prefix("/training/jobs/", "round-1")
    assert job == "training/jobs/round-1"
    assert keys.training_input(job) == "training/jobs/round-1/input/"
    assert keys.training_input(job, "train.json") == "training/jobs/round-1/input/train.json"
    assert keys.training_output(job, "train.log") == "training/jobs/round-1/output/train.log"
    assert keys.report_file("r1", "report.md") == "reports/r1/report.md"
    assert keys.report_latest() == "reports/latest"
    listed = ["reports/latest", "reports/r2/report.md", "reports/r1/report.md", "reports/r1/x.png"]
    assert keys.report_runs(listed) == ["r1", "r2"]
    assert keys.bench_blob("t", "b5-0", "image") == "bench/t/b5-0/image.nii.gz"

"""The user's folders as a transfer run's data: a labelled clinical folder is the simulated
annotators' truth, and it is never uploaded as labels."""

from typing import Any

import numpy as np
import pytest

from ctloop.transfer import RunFailed
from ctloop.transfer.run import TransferRun
from ctloop.transfer.volumes import folder_volumes
from tests.helpers.folders import CANONICAL, write_folder


def test_a_labelled_clinical_folder_is_the_annotators_truth(tmp_path):
    write_folder(tmp_path / "pub", 2, 2)
    raw = write_folder(tmp_path / "cli", 4, 4, seed=1)
    write_folder(tmp_path / "ev", 1, 1, seed=2)
    data = folder_volumes(tmp_path / "pub", tmp_path / "cli", tmp_path / "ev")
    assert set(data.truth) == set(data.clinical) == set(raw)
    for vid, label in raw.items():
        assert np.array_equal(data.truth[vid], CANONICAL[label])
    assert [site for site, *_ in data.clinical.values()] == ["hospital-a", "hospital-b"] * 2
    assert list(data.evaluation) == ["ev_000"] and len(data.public) == 2


def test_an_unlabelled_clinical_folder_leaves_no_truth(tmp_path):
    write_folder(tmp_path / "pub", 2, 2)
    write_folder(tmp_path / "cli", 3, 0)
    data = folder_volumes(tmp_path / "pub", tmp_path / "cli", None)
    assert data.truth == {} and len(data.clinical) == 3 and data.evaluation == {}


def test_partly_labelled_clinical_or_unlabelled_public_folders_are_refused(tmp_path):
    write_folder(tmp_path / "pub", 2, 2)
    write_folder(tmp_path / "cli", 3, 2)
    with pytest.raises(RunFailed, match="1 of 3 volumes have no label"):
        folder_volumes(tmp_path / "pub", tmp_path / "cli", None)
    write_folder(tmp_path / "nolab", 2, 1)
    with pytest.raises(RunFailed, match="every volume needs a label"):
        folder_volumes(tmp_path / "nolab", tmp_path / "pub", None)


class RecordingApi:
    """Stands in for the ingest API: records what each upload is given."""

    def __init__(self) -> None:
        self.uploads: dict[str, dict[str, Any]] = {}

    def post(self, path: str, **kwargs: Any) -> Any:
        if path == "/v1/volumes":
            self.uploads[kwargs["data"]["volume_id"]] = kwargs
        return type("Answer", (), {"status_code": 201, "text": ""})()


def test_clinical_labels_are_never_uploaded_as_labels(tmp_path):
    write_folder(tmp_path / "pub", 2, 2)
    write_folder(tmp_path / "cli", 2, 2, seed=1)
    write_folder(tmp_path / "ev", 1, 1, seed=2)
    data = folder_volumes(tmp_path / "pub", tmp_path / "cli", tmp_path / "ev")
    run = TransferRun("tiny", data=data, echo=lambda _: None)
    assert run.sites is None  # the folders are the data: no phantom sites
    api = RecordingApi()
    run.admin = api  # type: ignore[assignment]
    run.ingest()
    by_dataset: dict[str, list[dict[str, Any]]] = {}
    for up in api.uploads.values():
        by_dataset.setdefault(up["data"]["dataset"], []).append(up)
    assert len(by_dataset["clinical"]) == 2 and data.truth
    assert all(set(up["files"]) == {"file"} for up in by_dataset["clinical"])
    assert all("label" in up["files"] for up in by_dataset["public"] + by_dataset["evaluation"])

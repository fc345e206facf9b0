"""``ctloop run`` and ``ctloop experiment transfer`` choose their sites, and their data, before
anything starts: a bad profile is refused with its field named and nothing runs."""

import json
from typing import Any

import pytest

from ctloop import cli
from ctloop.core.phantom import SITES
from tests.helpers.folders import write_folder


class FakeRun:
    """Stands in for TransferRun: records how the CLI built it."""

    made: list[dict[str, Any]] = []

    def __init__(self, preset: str, **kwargs: Any) -> None:
        FakeRun.made.append({"preset": preset, **kwargs})

    def run(self) -> dict[str, Any]:
        return {"run_id": "r", "igniter_vs_final": {}}


@pytest.fixture
def fake_run(monkeypatch):
    FakeRun.made = []
    monkeypatch.setattr("ctloop.transfer.run.TransferRun", FakeRun)
    return FakeRun.made


@pytest.fixture
def bad_profile(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "bad", "noise_hu": 500.0, "contrast": 2.0}))
    return str(path)


def test_run_passes_each_hospital_its_clinical_site(fake_run):
    rc = cli.main(["run", "--preset", "tiny", "--clinical-site", "clinical-b",
                   "--clinical-site", "clinical-c", "--evaluation-site", "clinical-a"])  # fmt: skip
    assert rc == 0
    sites = fake_run[0]["sites"]
    assert sites.hospitals == {"hospital-a": SITES["clinical-b"], "hospital-b": SITES["clinical-c"]}
    assert sites.evaluation == SITES["clinical-a"] and sites.public == SITES["public"]


@pytest.mark.parametrize("option", ["--public-site", "--clinical-site", "--evaluation-site"])
def test_run_refuses_a_bad_profile_before_anything_runs(fake_run, bad_profile, option, capsys):
    assert cli.main(["run", option, bad_profile]) == 2
    err = capsys.readouterr().err
    assert "noise_hu: Input should be less than or equal to 150" in err
    assert "contrast: unknown field" in err
    assert fake_run == []


def test_run_refuses_three_clinical_sites_and_sites_with_folders(fake_run, tmp_path, capsys):
    three = ["--clinical-site", "clinical-a", "--clinical-site", "clinical-b",
             "--clinical-site", "clinical-c"]  # fmt: skip
    assert cli.main(["run", *three]) == 2
    assert "at most 2" in capsys.readouterr().err
    write_folder(tmp_path / "pub", 1, 1)
    write_folder(tmp_path / "cli", 1, 1)
    folders = ["--public", str(tmp_path / "pub"), "--clinical", str(tmp_path / "cli")]
    assert cli.main(["run", *folders, "--clinical-site", "clinical-b"]) == 2
    assert fake_run == []


def test_a_labelled_clinical_folder_keeps_the_simulated_annotators(fake_run, tmp_path):
    write_folder(tmp_path / "pub", 1, 1)
    write_folder(tmp_path / "cli", 2, 2)
    write_folder(tmp_path / "raw", 2, 0)
    base = ["run", "--annotators", "3", "--public", str(tmp_path / "pub"), "--clinical"]
    assert cli.main([*base, str(tmp_path / "cli")]) == 0
    assert cli.main([*base, str(tmp_path / "raw")]) == 0
    labelled, unlabelled = fake_run
    assert labelled["annotators_per_site"] == 3 and len(labelled["data"].truth) == 2
    assert labelled["sites"] is None
    assert unlabelled["annotators_per_site"] == 0 and unlabelled["data"].truth == {}


def test_experiment_transfer_takes_the_same_site_options(monkeypatch, tmp_path, bad_profile):
    calls: list[dict[str, Any]] = []

    def fake_transfer(preset: str, out: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        return {"summary": {}}

    monkeypatch.setattr("ctloop.core.experiment.run_transfer", fake_transfer)
    base = ["experiment", "transfer", "--preset", "tiny", "--out", str(tmp_path / "x")]
    assert cli.main([*base, "--clinical-site", bad_profile]) == 2
    assert calls == []
    assert cli.main(base) == 0
    assert [p.name for p in calls[0]["clinical_sites"]] == ["clinical-a"]
    assert calls[0]["public_site"] == SITES["public"] and calls[0]["evaluation_site"] is None
    args = [*base, "--clinical-site", "clinical-b", "--clinical-site", "clinical-c",
            "--evaluation-site", "clinical-a", "--public-site", "clinical-c"]  # fmt: skip
    assert cli.main(args) == 0
    assert [p.name for p in calls[1]["clinical_sites"]] == ["clinical-b", "clinical-c"]
    assert calls[1]["evaluation_site"] == SITES["clinical-a"]
    assert calls[1]["public_site"] == SITES["clinical-c"]

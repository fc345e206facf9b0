"""The ``ctloop`` command a user types, run as a subprocess."""

import json
import subprocess
import sys

import pytest

CTLOOP = [sys.executable, "-m", "ctloop.cli"]


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTLOOP, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["stack"],
        ["synth"],
        ["train"],
        ["segment"],
        ["experiment", "transfer"],
        ["info"],
        ["services"],
        ["status"],
        ["admin"],
        ["admin", "user"],
    ],
)
def test_every_subcommand_has_help(command):
    result = _run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: ctloop" in result.stdout


def test_synth_lists_sites_and_writes_a_decathlon_folder(tmp_path):
    listed = _run("synth", "--list-sites")
    assert listed.returncode == 0
    assert {"public", "clinical-a", "clinical-b", "clinical-c"} <= {
        line.split()[0] for line in listed.stdout.splitlines()
    }
    out = tmp_path / "ds"
    made = _run("synth", "--site", "clinical-b", "--count", "2", "--seed", "3", "--size", "tiny",
                "--out", str(out))  # fmt: skip
    assert made.returncode == 0, made.stderr
    spec = json.loads((out / "dataset.json").read_text())
    assert spec["numTraining"] == 2
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "clinical-b_00003.nii.gz",
        "clinical-b_00004.nii.gz",
    ]
    assert len(list((out / "labelsTr").iterdir())) == 2


def test_unknown_site_is_a_clear_error(tmp_path):
    result = _run("synth", "--site", "nowhere", "--out", str(tmp_path / "x"))
    assert result.returncode != 0
    assert "unknown site 'nowhere'" in result.stderr


def test_experiment_transfer_writes_result_json(tmp_path):
    result = _run("experiment", "transfer", "--preset", "tiny", "--out", str(tmp_path / "exp"))
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads((tmp_path / "exp" / "result.json").read_text())
    for model in ("igniter", "sustainer"):
        for split in ("public_test", "clinical_test"):
            assert 0.0 <= data[model][split]["mean_dice"] <= 1.0
    assert set(data["summary"]) >= {"igniter_public_dice", "igniter_clinical_dice",
                                    "sustainer_clinical_dice", "gap_closed_fraction"}  # fmt: skip

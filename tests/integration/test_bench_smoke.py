"""Every benchmark runs on its smallest preset and writes its result entry (no timings are
asserted: benchmarks are not tests; ``make bench`` measures)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from ctloop.settings import REPO_ROOT
from tests.helpers.proc import run_logged

BENCHMARKS = {
    "1_preannotation",
    "2_throughput",
    "3_training",
    "4_round",
    "5_ingest",
    "6_bus",
    "7_memory",
}


@pytest.mark.long  # ~5 min alone, up to 13 in CI: make test-long, outside CI's 60 minutes
@pytest.mark.timeout(900)  # two platforms start on 2 loaded cores: minutes
def test_every_benchmark_runs_on_the_smoke_preset_and_writes_its_result(tmp_path: Path):
    out = tmp_path / "results"
    run = run_logged(
        [
            sys.executable,
            "-m",
            "bench",
            "--preset",
            "smoke",
            "--out",
            str(out),
            "--work",
            str(tmp_path / "work"),
            "--port-base",
            "29100",
        ],
        log_dir=tmp_path / "output",
        cwd=REPO_ROOT,
        timeout=780,  # + up to 120 s to stop it: under the 900 s above
    )
    assert run.returncode == 0, run.tail()
    doc = json.loads((out / "latest.json").read_text())
    assert doc["preset"] == "smoke" and doc["machine"]["cores"]
    assert set(doc["benchmarks"]) == BENCHMARKS
    for name, entry in doc["benchmarks"].items():
        for key in ("ctloop_median", "baseline_median", "ratio"):
            assert isinstance(entry[key], float) and math.isfinite(entry[key]), (name, key)
        assert entry["settings"] and entry["unit"] and entry["baseline"], name
    table = (out / "latest.md").read_text()
    assert table.count("\n| ") >= 1 + len(BENCHMARKS)  # header + one row per benchmark

"""The chart rendered by the real ``helm template`` (no mocks), once per set of values."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ctloop.settings import REPO_ROOT

CHART = REPO_ROOT / "helm" / "ctloop"
EXAMPLES = sorted((REPO_ROOT / "k8s" / "examples").glob("*.yaml"))
HELM = os.environ.get("HELM", str(REPO_ROOT / ".ctloop" / "tools" / "bin" / "helm"))
KUBE_VERSION = os.environ.get("KUBE_VERSION", "1.37.0")
NAMESPACE = "ctloop"
RELEASE = "ctloop"

Doc = dict[str, Any]


def helm_template(*args: str) -> subprocess.CompletedProcess[str]:
    if not Path(HELM).exists():
        pytest.fail(f"helm is not installed at {HELM}: run `make setup`")
    cmd = [HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    return subprocess.run(
        [*cmd, "--kube-version", KUBE_VERSION, *args], capture_output=True, text=True, check=False
    )


@functools.cache
def _render(args: tuple[str, ...]) -> tuple[Doc, ...]:
    result = helm_template(*args)
    if result.returncode != 0:
        raise AssertionError(f"helm template {' '.join(args)} failed:\n{result.stderr}")
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def render(*values_files: Path, set_values: tuple[str, ...] = ()) -> list[Doc]:
    args: list[str] = []
    for f in values_files:
        args += ["-f", str(f)]
    for s in set_values:
        args += ["--set", s]
    return list(_render(tuple(args)))


# Every rendering the invariants are checked on: the defaults and each example.
SETUPS = {"default": (), **{f.stem: (f,) for f in EXAMPLES}}


@pytest.fixture(params=sorted(SETUPS), ids=sorted(SETUPS))
def rendered(request: pytest.FixtureRequest) -> list[Doc]:
    return render(*SETUPS[request.param])


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [d for d in docs if d["kind"] == kind]


def named(docs: list[Doc], kind: str, component: str) -> Doc:
    name = f"{RELEASE}-{component}"
    found = [d for d in of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert found, f"no {kind} {name}"
    return found[0]


def pod_specs(docs: list[Doc]) -> list[tuple[str, Doc]]:
    """(workload name, pod spec) of every Deployment, StatefulSet and Job."""
    return [
        (d["metadata"]["name"], d["spec"]["template"]["spec"])
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet")
    ]

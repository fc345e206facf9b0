"""The chart in a real cluster (``make test-cluster``; not part of ``make test``).

The session installs the release once with the small-node and local-images values plus the
tiny transfer preset's training policy, and every test works on it in order: install and
``helm test``, a round end to end, an upgrade during a round, pods deleted mid-round, uninstall;
then the 3-broker variant as a release of its own. Each step prints its time, and the session
ends with the table of all of them.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from ctloop.grpc_tls import TlsPair
from ctloop.transfer.presets import PRESETS
from ctloop.transfer.run import TransferRun
from ctloop.transfer.volumes import Volumes, synthetic_volumes
from tests.cluster import kube

NAMESPACE = "ctloop"
RELEASE = "ctloop"
PRESET = "tiny"
STEPS: list[tuple[str, float, str]] = []


@contextmanager
def step(name: str) -> Iterator[None]:
    """One timed step: ``[test-cluster] NAME ... ok (N s)``, kept for the session's table."""
    print(f"\n[test-cluster] {name} ...", flush=True)
    t0 = time.monotonic()
    outcome = "FAILED"
    try:
        yield
        outcome = "ok"
    finally:
        took = time.monotonic() - t0
        STEPS.append((name, took, outcome))
        print(f"[test-cluster] {name} ... {outcome} ({took:.0f} s)", flush=True)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not STEPS:
        return
    terminalreporter.section("test-cluster steps")
    for name, took, outcome in STEPS:
        terminalreporter.write_line(f"{took:7.0f} s  {outcome:6}  {name}")
    terminalreporter.write_line(f"{sum(t for _, t, _ in STEPS):7.0f} s  total")


@dataclass
class Release:
    """The installed release and what the tests reach it with."""

    namespace: str
    name: str
    data: Volumes
    values: list[str] = field(default_factory=list)

    def service(self, component: str) -> str:
        items = kube.kubectl_json(
            "get",
            "svc",
            "-n",
            self.namespace,
            "-l",
            f"app.kubernetes.io/instance={self.name},app.kubernetes.io/component={component}",
        )["items"]
        names = sorted(s["metadata"]["name"] for s in items if s["spec"].get("clusterIP") != "None")
        assert names, f"no Service for {component} in {self.namespace}"
        return f"svc/{names[0]}"

    @property
    def admin_token(self) -> str:
        """The bootstrap admin's token, from the Secret the chart keeps for it."""
        secrets = kube.kubectl_json("get", "secrets", "-n", self.namespace)["items"]
        name = next(
            s["metadata"]["name"] for s in secrets if s["metadata"]["name"].endswith("-admin-token")
        )
        return kube.secret_value(self.namespace, name, "token")

    @property
    def operator_grpc_token(self) -> str:
        """The operator's gRPC token (mounted nowhere; admins read it from the release's
        ``<release>-grpc-tokens`` Secret to drive training and inference and post reports)."""
        secrets = kube.kubectl_json("get", "secrets", "-n", self.namespace)["items"]
        name = next(
            s["metadata"]["name"] for s in secrets if s["metadata"]["name"].endswith("-grpc-tokens")
        )
        return kube.secret_value(self.namespace, name, "operator-token")

    @property
    def operator_grpc_tls(self) -> TlsPair | None:
        """The operator's gRPC TLS pair (the ``<release>-grpc-tls-operator`` Secret, mounted
        nowhere), or None when the release has gRPC TLS off."""
        secrets = kube.kubectl_json("get", "secrets", "-n", self.namespace)["items"]
        found = [s for s in secrets if s["metadata"]["name"].endswith("-grpc-tls-operator")]
        if not found:
            return None
        data = {k: base64.b64decode(v) for k, v in found[0]["data"].items()}
        return TlsPair("operator", data["tls.crt"], data["tls.key"], data["ca.crt"])


# The policy settings the chart has values for (it sets their variables itself; the same name
# again in extraEnv is a duplicate env entry, which `helm upgrade` cannot patch).
CHART_VALUES = {
    "CTLOOP_TRAINING__IGNITER_MIN_VOLUMES": "igniterMinVolumes",
    "CTLOOP_TRAINING__ROUND_MIN_NEW": "roundMinNew",
    "CTLOOP_TRAINING__IGNITER_STEPS": "igniterSteps",
    "CTLOOP_TRAINING__SUSTAINER_STEPS": "sustainerSteps",
}


def policy_values(data: Volumes) -> dict[str, object]:
    """The tiny preset's training policy as the chart's values (what ``ctloop run`` gives its
    local training service): chart values where the chart has them, extraEnv for the rest."""
    env = TransferRun(PRESET, data=data).policy_env()
    training: dict[str, object] = {
        CHART_VALUES[k]: int(v) for k, v in env.items() if k in CHART_VALUES
    }
    training["extraEnv"] = [
        {"name": k, "value": v}
        for k, v in sorted(env.items())
        if k.startswith("CTLOOP_TRAINING__")
        and k not in CHART_VALUES
        and k != "CTLOOP_TRAINING__NPROC_PER_NODE"  # training.job.gpusPerNode (1 here)
    ]
    return {"training": training}


def install(namespace: str, name: str, values: list[str], extra: dict[str, object]) -> None:
    files = [a for v in values for a in ("-f", str(kube.EXAMPLES / v))]
    extra_file = kube.REPO_ROOT / ".ctloop" / f"test-cluster-{namespace}-{name}.json"
    extra_file.parent.mkdir(parents=True, exist_ok=True)
    extra_file.write_text(json.dumps(extra))
    kube.helm(
        "upgrade",
        "--install",
        name,
        str(kube.CHART),
        "-n",
        namespace,
        "--create-namespace",
        *files,
        "-f",
        str(extra_file),
        "--wait",
        "--timeout",
        "20m",
        timeout=1500,
    )


def wait_ready(namespace: str, timeout_s: float = 1200) -> None:
    try:
        kube.until(
            f"every pod in {namespace} Ready",
            lambda: kube.workloads_ready(namespace),
            timeout_s,
            poll_s=5,
        )
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}: {kube.not_ready_summary(namespace)}") from None


@pytest.fixture(scope="session")
def release() -> Iterator[Release]:
    data = synthetic_volumes(PRESETS[PRESET], seed=0, prefix="k8s-")
    values = ["small-node.yaml", "local-images.yaml"]
    with step(f"helm install {RELEASE} (small-node + local-images, preset {PRESET})"):
        install(NAMESPACE, RELEASE, values, policy_values(data))
        wait_ready(NAMESPACE)
    yield Release(NAMESPACE, RELEASE, data, values)

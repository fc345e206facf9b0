"""kubectl and helm against the cluster `make cluster-up` started (KUBECONFIG, CTLOOP_K8S_BIN,
HELM from `make test-cluster`), with the waits the cluster tests need."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ctloop.settings import REPO_ROOT
from tests.helpers.net import free_port

CHART = REPO_ROOT / "helm" / "ctloop"
EXAMPLES = REPO_ROOT / "k8s" / "examples"


class KubeError(RuntimeError):
    """A kubectl or helm command failed; the message carries its output."""


_BIN = os.environ.get("CTLOOP_K8S_BIN")
KUBECTL = str(Path(_BIN) / "kubectl") if _BIN else "kubectl"
HELM = os.environ.get("HELM") or "helm"


def run(cmd: list[str], timeout: float = 600, check: bool = True) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise KubeError(f"{' '.join(cmd)} -> {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done.stdout


def kubectl(*args: str, timeout: float = 600, check: bool = True) -> str:
    return run([KUBECTL, *args], timeout=timeout, check=check)


def kubectl_json(*args: str) -> Any:
    return json.loads(kubectl(*args, "-o", "json"))


def helm(*args: str, timeout: float = 1200) -> str:
    return run([HELM, *args], timeout=timeout)


def until(what: str, check: Callable[[], Any], timeout_s: float, poll_s: float = 3.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (KubeError, OSError) as exc:
            last = exc
        time.sleep(poll_s)
    raise TimeoutError(
        f"timed out after {timeout_s:.0f} s waiting for {what}"
        + (f" (last error: {last})" if last else "")
    )


def pods(namespace: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", "pods", "-n", namespace] + (["-l", selector] if selector else [])
    items: list[dict[str, Any]] = kubectl_json(*args)["items"]
    return items


def ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def workloads_ready(namespace: str) -> bool:
    """Every Deployment and StatefulSet has all its replicas updated and ready."""
    for kind in ("deployments", "statefulsets"):
        for w in kubectl_json("get", kind, "-n", namespace)["items"]:
            want = w["spec"].get("replicas", 1)
            st = w.get("status", {})
            if st.get("readyReplicas", 0) != want or st.get("updatedReplicas", 0) != want:
                return False
            if st.get("observedGeneration", 0) < w["metadata"]["generation"]:
                return False
    return True


def not_ready_summary(namespace: str) -> str:
    lines = []
    for p in pods(namespace):
        if not ready(p) and p["status"].get("phase") != "Succeeded":
            states = [
                f"{c['name']}:{next(iter(c.get('state', {})), '?')}"
                for c in p["status"].get("containerStatuses", [])
            ]
            lines.append(f"{p['metadata']['name']} {p['status'].get('phase')} {states}")
    return "; ".join(lines) or "all ready"


def secret_value(namespace: str, name: str, key: str) -> str:
    data = kubectl_json("get", "secret", name, "-n", namespace)["data"]
    return base64.b64decode(data[key]).decode()


@contextmanager
def port_forward(namespace: str, target: str, remote_ports: list[int]) -> Iterator[list[int]]:
    """``kubectl port-forward`` of ``target`` (e.g. ``svc/ctloop-ingest``) to free local ports,
    kept alive (restarted when the pod behind it is replaced) until the block ends."""
    local = [free_port() for _ in remote_ports]
    spec = [f"{lp}:{rp}" for lp, rp in zip(local, remote_ports, strict=True)]
    stop = False
    proc: subprocess.Popen[bytes] | None = None

    def start() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [KUBECTL, "port-forward", "-n", namespace, "--address", "127.0.0.1", target, *spec],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def keep() -> None:
        nonlocal proc
        while not stop:
            proc = start()
            while proc.poll() is None and not stop:
                time.sleep(0.5)
            if not stop:
                time.sleep(1)

    keeper = threading.Thread(target=keep, daemon=True)
    keeper.start()

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", local[0])) == 0

    until(f"port-forward to {target}", listening, 60, poll_s=0.5)
    try:
        yield local
    finally:
        stop = True
        if proc is not None and proc.poll() is None:
            proc.terminate()
        keeper.join(timeout=5)

"""The ctloop services run as local processes on the embedded stack (``make services-up``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import httpx

from ctloop.settings import REPO_ROOT, Endpoint, Settings
from ctloop.stack.components import Component, Health

# Service name -> the module that runs it (``python -m``).
SERVICES: dict[str, str] = {
    "ingest": "services.ingest",
    "inference": "services.inference",
    "training": "services.training",
    "metrics": "services.metrics",
}


class ServiceProcess(Component):
    """One ctloop service; healthy when its ``/readyz`` answers 200."""

    def __init__(self, settings: Settings, name: str, module: str) -> None:
        self.name = name
        self.module = module
        super().__init__(settings)

    @property
    def endpoint(self) -> Endpoint:
        ep: Endpoint = getattr(self.settings.services, self.name)
        return ep

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def env(self) -> dict[str, str]:
        path = os.environ.get("PYTHONPATH", "")
        return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{path}" if path else str(REPO_ROOT)}

    def listens(self) -> list[tuple[str, int]]:
        host, ep = self.settings.services.host, self.endpoint
        return [(host, ep.http_port)] + ([(host, ep.grpc_port)] if ep.grpc_port else [])

    def health(self) -> Health:
        url = f"http://{self.settings.services.host}:{self.endpoint.http_port}/readyz"
        try:
            r = httpx.get(url, timeout=3.0)
        except httpx.HTTPError as exc:
            return Health(False, f"not answering: {type(exc).__name__}")
        if r.status_code != 200:
            failing = [k for k, v in r.json().get("checks", {}).items() if not v.get("ok")]
            return Health(False, f"not ready: {', '.join(failing) or r.status_code}")
        return Health(True, "ready")

    def describe(self) -> str:
        h, ep = self.settings.services.host, self.endpoint
        return f"http://{h}:{ep.http_port}, gRPC {h}:{ep.grpc_port}"


def service_components(settings: Settings) -> list[Component]:
    return [ServiceProcess(settings, name, module) for name, module in SERVICES.items()]


def instance_env(
    run_dir: Path,
    port_base: int,
    tag: str,
    group_prefix: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a separate platform instance on the shared stack: its own run folder
    and SQLite workflow database, ports (HTTP ``port_base + 2i``, gRPC the next, in the order of
    ``SERVICES``), model names ending in ``tag`` and, with ``group_prefix``, its own consumer
    groups. Tests, benchmarks and ``ctloop run`` start their services with it."""
    env = {
        "CTLOOP_RUN_DIR": str(run_dir),
        "CTLOOP_DB__URL": f"sqlite:///{run_dir / 'workflow.db'}",
        "CTLOOP_SERVICES__IGNITER_MODEL": f"igniter{tag}",
        "CTLOOP_SERVICES__SUSTAINER_MODEL": f"sustainer{tag}",
    }
    if group_prefix is not None:
        env["CTLOOP_KAFKA__GROUP_PREFIX"] = group_prefix
    for i, name in enumerate(SERVICES):
        env[f"CTLOOP_SERVICES__{name.upper()}__HTTP_PORT"] = str(port_base + 2 * i)
        env[f"CTLOOP_SERVICES__{name.upper()}__GRPC_PORT"] = str(port_base + 2 * i + 1)
    return {**env, **(extra or {})}

"""The ctloop services run as local processes on the embedded stack (``make services-up``)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

import httpx

from ctloop.rpc_auth import ensure_tokens_file
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

    def __init__(
        self, settings: Settings, name: str, module: str, env: Mapping[str, str] | None = None
    ) -> None:
        self.name = name
        self.module = module
        self.base_env = env
        super().__init__(settings)

    @property
    def endpoint(self) -> Endpoint:
        ep: Endpoint = getattr(self.settings.services, self.name)
        return ep

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The services' gRPC tokens (kept if the file exists: running services keep theirs).
        ensure_tokens_file(self.settings.grpc_tokens_file)

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module]

    def env(self) -> dict[str, str]:
        base = os.environ if self.base_env is None else self.base_env
        path = base.get("PYTHONPATH", "")
        return {**base, "PYTHONPATH": f"{REPO_ROOT}:{path}" if path else str(REPO_ROOT)}

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


def service_components(settings: Settings, env: Mapping[str, str] | None = None) -> list[Component]:
    """The four services; ``env`` is their processes' environment (default: this process's),
    which a platform instance (``ctloop.platform``) sets to its own."""
    return [ServiceProcess(settings, name, module, env) for name, module in SERVICES.items()]

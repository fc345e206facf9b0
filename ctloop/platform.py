"""A platform instance: the four ctloop services as local processes on the shared stack, with
their own run folder, workflow database, ports, model names and consumer groups.

``ctloop run``, the benchmarks and the integration tests each start their services this way, so
they never mix with ``make services-up`` or with each other. The services are started the way
``ctloop services up`` starts them (the same components), with the instance's environment passed
to their processes; this process's own environment is left as it is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from ctloop.grpc_tls import TlsPair
from ctloop.kafka_security import credentials_path, grant_groups
from ctloop.rpc_auth import channel, service_channel
from ctloop.settings import REPO_ROOT, Settings
from ctloop.stack import LocalStack
from ctloop.stack.services import SERVICES, service_components

Printer = Callable[[str], None]


class PlatformTimeout(TimeoutError):
    """A condition a caller waited for did not come; the message carries the services' logs."""


def instance_env(
    run_dir: Path,
    port_base: int,
    tag: str,
    group_prefix: str | None = None,
) -> dict[str, str]:
    """The environment of a separate platform instance on the shared stack: its own run folder
    and SQLite workflow database, ports (HTTP ``port_base + 2i``, gRPC the next, in the order of
    ``SERVICES``), model names ending in ``tag`` and, with ``group_prefix``, its own consumer
    groups."""
    env = {
        "CTLOOP_RUN_DIR": str(run_dir),
        "CTLOOP_DB__URL": f"sqlite:///{run_dir / 'workflow.db'}",
        "CTLOOP_SERVICES__IGNITER_MODEL": f"igniter{tag}",
        "CTLOOP_SERVICES__SUSTAINER_MODEL": f"sustainer{tag}",
    }
    if group_prefix is not None:
        env["CTLOOP_KAFKA__GROUP_PREFIX"] = group_prefix
    # The stack's Kafka credentials (SASL): this instance's run folder has none of its own.
    stack = Settings()
    stack_kafka = credentials_path(stack)
    if stack_kafka is not None:
        env["CTLOOP_KAFKA__CREDENTIALS_FILE"] = str(stack_kafka)
    # ... and its S3 identities' keys (each service then reads only its own grant's key)
    env["CTLOOP_S3__CREDENTIALS_DIR"] = str(
        stack.s3.credentials_dir or stack.run_dir / "s3-credentials"
    )
    for i, name in enumerate(SERVICES):
        env[f"CTLOOP_SERVICES__{name.upper()}__HTTP_PORT"] = str(port_base + 2 * i)
        env[f"CTLOOP_SERVICES__{name.upper()}__GRPC_PORT"] = str(port_base + 2 * i + 1)
    return env


def settings_from(env: Mapping[str, str]) -> Settings:
    """The settings a process started with ``env`` sees (for this process's own clients)."""
    ours = {k: v for k, v in env.items() if k.startswith("CTLOOP_")}
    saved = {k: os.environ.get(k) for k in ours}
    os.environ.update(ours)
    try:
        return Settings()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def logs_tail(logs_dir: Path, chars: int = 1500) -> str:
    """The last ``chars`` of every service log in ``logs_dir``, as JSON (for failure messages)."""
    tails = {p.name: p.read_text()[-chars:] for p in sorted(logs_dir.glob("*.log"))}
    return json.dumps(tails, indent=1)


def until(
    what: str,
    check: Callable[[], Any],
    timeout_s: float,
    logs_dir: Path | None,
    poll_s: float = 1.0,
) -> Any:
    """Poll ``check`` until it returns something truthy and return that; on timeout raise
    :class:`PlatformTimeout` with the tails of the services' logs (when they are local), which
    say why."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(poll_s)
    logs = f"; logs:\n{logs_tail(logs_dir)}" if logs_dir is not None else ""
    raise PlatformTimeout(f"timed out waiting for {what}{logs}")


class PlatformInstance:
    """The services of one instance: start, stop, reach and wait on them.

    ``extra_env`` tunes the instance (training policy, model config, sign-in); ``poll_s`` is how
    often :meth:`until` looks (the benchmarks time what they wait for, so they look often).
    """

    def __init__(
        self,
        run_dir: Path,
        port_base: int,
        tag: str,
        group_prefix: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        echo: Printer = print,
        poll_s: float = 1.0,
    ) -> None:
        self.run_dir = run_dir
        self.port_base = port_base
        self.tag = tag
        self.env: dict[str, str] = {
            **os.environ,
            **instance_env(run_dir, port_base, tag, group_prefix),
            **(extra_env or {}),
        }
        self.settings = settings_from(self.env)
        self.echo = echo
        self.poll_s = poll_s
        svc = self.settings.services
        self.igniter, self.sustainer = svc.igniter_model, svc.sustainer_model
        self.api = f"http://{svc.host}:{svc.ingest.http_port}"
        self.metrics_url = f"http://{svc.host}:{svc.metrics.http_port}"
        self.training_target = svc.grpc_target("training")
        self.inference_target = svc.grpc_target("inference")
        self.token_hint = f"admin token in {self.settings.admin_token_file}"
        self.logs_dir = self.settings.logs_dir

    def _services(self) -> LocalStack:
        components = service_components(self.settings, env=self.env)
        return LocalStack(self.settings, echo=self.echo, components=components)

    def up(self) -> None:
        """Start the services that are not running and wait until each is ready (on a SASL
        broker, after letting them use the instance's own consumer groups)."""
        grant_groups(self.settings)
        self._services().up()

    def down(self) -> None:
        self._services().down()

    @property
    def admin_token(self) -> str:
        """The bootstrap admin's token (written by the ingest service on its first start)."""
        return self.settings.admin_token_file.read_text().strip()

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def grpc_channel(
        self, target: str, options: Sequence[tuple[str, Any]] | None = None
    ) -> grpc.Channel:
        """A channel to one of this instance's gRPC APIs, as the operator (its token is in the
        instance's run folder, written when the services start)."""
        return service_channel(self.settings, "operator", target, options)

    def ctloop(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        """``ctloop ARGS`` as this instance (e.g. ``services status``), output captured."""
        return subprocess.run(
            [sys.executable, "-m", "ctloop.cli", *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def logs_tail(self, chars: int = 1500) -> str:
        return logs_tail(self.logs_dir, chars)

    def until(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        """:func:`until`, with this instance's logs and pace."""
        return until(what, check, timeout_s, self.logs_dir, self.poll_s)


@dataclass
class RemotePlatform:
    """A platform that already runs elsewhere (e.g. a Helm release reached through
    ``kubectl port-forward``): the endpoints a transfer run talks to, and nothing to start or
    stop. Same surface as :class:`PlatformInstance` for :class:`ctloop.transfer.run.TransferRun`.
    """

    api: str
    metrics_url: str
    training_target: str
    inference_target: str
    admin_token: str
    igniter: str = "igniter"
    sustainer: str = "sustainer"
    poll_s: float = 2.0
    token_hint: str = "the release's bootstrap admin token"
    # The release's operator gRPC token (key operator-token of its <release>-grpc-tokens
    # Secret); without it the services refuse the run's gRPC calls.
    grpc_token: str = ""
    # the operator's TLS pair (the release's grpc-tls-operator Secret) when gRPC TLS is on
    grpc_tls: TlsPair | None = None

    def up(self) -> None:
        """Nothing to start: the release runs on its own."""

    def down(self) -> None:
        """Nothing to stop: the release outlives the run."""

    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def grpc_channel(
        self, target: str, options: Sequence[tuple[str, Any]] | None = None
    ) -> grpc.Channel:
        """A channel to one of the release's gRPC APIs, as the operator (over mutual TLS with
        the operator's pair when the release has gRPC TLS on)."""
        return channel(target, "operator", self.grpc_token, options, self.grpc_tls)

    def until(self, what: str, check: Callable[[], Any], timeout_s: float) -> Any:
        return until(what, check, timeout_s, None, self.poll_s)


@contextmanager
def running(platform: PlatformInstance) -> Iterator[PlatformInstance]:
    """``platform`` up for the block, down after it (also after a start that failed half-way:
    the services it did start are stopped)."""
    try:
        platform.up()
        yield platform
    finally:
        platform.down()

"""What every server of the embedded stack is: a :class:`Component` the stack manager prepares,
starts, health-checks and finishes setting up, and the error it raises when it cannot.

A component knows how to prepare its data directory once, the command that runs it, how to tell
it is healthy and what to do once it is (create topics, buckets, databases). Nothing in this
package mocks a server: Kafka is Apache Kafka, S3 is Versity Gateway, Triton is NVIDIA's
tritonserver, SQL is SQLite or PostgreSQL.
"""

from __future__ import annotations

import os
import socket
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path

from ctloop.settings import Settings
from ctloop.stack.process import ManagedProcess


class StackError(RuntimeError):
    """A component could not be set up or started; the message says what to do."""


@dataclass
class Health:
    ok: bool
    detail: str


class Component(ABC):
    """One server of the local stack."""

    name: str
    needs_process = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process = ManagedProcess(self.name, settings.state_dir, settings.logs_dir)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir / self.name

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """One-time initialisation of the data directory (idempotent)."""

    @abstractmethod
    def command(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @abstractmethod
    def health(self) -> Health: ...

    def after_start(self) -> None:  # noqa: B027 - optional hook
        """Runs once the component is healthy (create topics, buckets, ...); idempotent."""

    def describe(self) -> str:
        """Where a client reaches this component."""
        return ""

    def listens(self) -> list[tuple[str, int]]:
        """The addresses the component's process binds: free before it starts, or another
        process (an orphan of an earlier run, another program) would answer its health checks
        while ours fails to bind."""
        return []

    def check_ports_free(self) -> None:
        taken = [f"{h}:{p}" for h, p in self.listens() if port_open(h, p, timeout_s=0.5)]
        if taken:
            raise StackError(
                f"{self.name}: {', '.join(taken)} already answers, but not from a process this "
                f"stack started (no live pid in {self.process.pid_file}). Stop whatever holds it "
                "(`ss -ltnp` shows the owner) or give this stack other ports (CTLOOP_* settings)."
            )


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False

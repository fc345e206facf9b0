"""Start, health-check and stop the embedded stack; report each component's state."""

from __future__ import annotations

import contextlib
import fcntl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ctloop.settings import Settings
from ctloop.stack.components import Component, Health, StackError, stack_components

Printer = Callable[[str], None]

START_TIMEOUT_S = {"kafka": 90.0, "s3": 30.0, "postgres": 60.0, "ingest": 90.0,
                   "inference": 120.0, "training": 90.0, "metrics": 90.0}  # fmt: skip


@dataclass
class ComponentStatus:
    name: str
    state: str  # healthy | unhealthy | stopped | crashed
    pid: int | None
    detail: str
    where: str
    log_tail: str = ""

    @property
    def healthy(self) -> bool:
        return self.state == "healthy"

    def line(self) -> str:
        pid = f"pid {self.pid}" if self.pid else "-"
        return f"{self.name:<9} {self.state:<9} {pid:<11} {self.detail}  [{self.where}]"


class LocalStack:
    def __init__(
        self,
        settings: Settings,
        echo: Printer = print,
        only: set[str] | None = None,
        components: list[Component] | None = None,
    ) -> None:
        """``only`` limits the stack to the named components (e.g. ``{"postgres"}``);
        ``components`` replaces the servers with another set (the ctloop services)."""
        self.settings = settings
        chosen = components if components is not None else stack_components(settings)
        self.components = [c for c in chosen if only is None or c.name in only]
        self.echo = echo

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.settings.state_dir / "stack.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def up(self) -> None:
        """Start every component that is not running; a second call changes nothing."""
        with self._lock():
            for component in self.components:
                self._up_one(component)

    def _up_one(self, c: Component) -> None:
        if not c.needs_process:
            c.prepare()
            c.after_start()
            self.echo(f"{c.name:<9} ready     {c.describe()}")
            return
        if c.process.is_running():
            started = False
        else:
            c.check_ports_free()
            c.prepare()
            c.process.start(c.command(), env=c.env(), cwd=c.data_dir)
            started = True
        timeout = START_TIMEOUT_S.get(c.name, 60.0)
        if c.name == "triton":  # loading its backends takes longest; a deployment may say how long
            timeout = self.settings.triton.startup_timeout_s
        health = self._wait_healthy(c, timeout)
        c.after_start()
        verb = "started" if started else "running"
        self.echo(f"{c.name:<9} {verb:<9} pid {c.process.pid}  {c.describe()}  ({health.detail})")

    def _wait_healthy(self, c: Component, timeout_s: float) -> Health:
        deadline = time.monotonic() + timeout_s
        health = Health(False, "not checked")
        while time.monotonic() < deadline:
            if not c.process.is_running():
                raise StackError(
                    f"{c.name} exited during start-up; last lines of {c.process.log_file}:\n"
                    f"{c.process.log_tail()}"
                )
            health = c.health()
            if health.ok:
                return health
            time.sleep(0.5)
        raise StackError(
            f"{c.name} not healthy after {timeout_s:.0f}s ({health.detail}); last lines of "
            f"{c.process.log_file}:\n{c.process.log_tail()}"
        )

    def down(self) -> None:
        with self._lock():
            for c in reversed(self.components):
                if not c.needs_process:
                    continue
                was_running = c.process.is_running()
                c.process.stop()
                self.echo(f"{c.name:<9} stopped" + ("" if was_running else " (was not running)"))

    def status(self) -> list[ComponentStatus]:
        return [self._status_one(c) for c in self.components]

    def _status_one(self, c: Component) -> ComponentStatus:
        if not c.needs_process:
            h = c.health()
            return ComponentStatus(
                c.name, "healthy" if h.ok else "unhealthy", None, h.detail, c.describe()
            )
        pid = c.process.pid
        if not c.process.is_running():
            if pid is None:
                return ComponentStatus(c.name, "stopped", None, "not running", c.describe())
            return ComponentStatus(
                c.name,
                "crashed",
                pid,
                f"process {pid} is gone",
                c.describe(),
                log_tail=c.process.log_tail(),
            )
        h = c.health()
        return ComponentStatus(
            c.name,
            "healthy" if h.ok else "unhealthy",
            pid,
            h.detail,
            c.describe(),
            log_tail="" if h.ok else c.process.log_tail(),
        )

    def is_healthy(self) -> bool:
        return all(s.healthy for s in self.status())

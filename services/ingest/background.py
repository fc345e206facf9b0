"""Background tasks of one ingest process (MONAI Label's batch inference and scoring): what
runs, what ran, shown the way MONAI Label shows its tasks. No FastAPI here."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from services.ingest.errors import ApiError, not_found


@dataclass
class Task:
    """One batch-infer or scoring task, shown the way MONAI Label shows its tasks."""

    kind: str
    request: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    status: str = "RUNNING"
    start_ts: float = field(default_factory=time.time)
    end_ts: float | None = None
    total: int = 0
    done: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.kind,
            "status": self.status,
            "request": self.request,
            "start_ts": int(self.start_ts),
            "end_ts": int(self.end_ts) if self.end_ts else None,
            "total": self.total,
            "done": self.done,
            "failed": self.failed,
            "result": self.result,
        }


class Tasks:
    """The tasks of one ingest process, per kind, newest last (at most 50 kept per kind)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_kind: dict[str, list[Task]] = {}

    def running(self, kind: str) -> Task | None:
        return next((t for t in self.by_kind.get(kind, []) if t.status == "RUNNING"), None)

    def add(self, task: Task) -> Task:
        with self.lock:
            if self.running(task.kind) is not None:
                raise ApiError("task_running", f"a {task.kind} task is running already", 429)
            kept = self.by_kind.setdefault(task.kind, [])
            kept.append(task)
            del kept[:-50]
        return task

    def answer(self, kind: str, all_: bool, check_if_running: bool) -> Any:
        tasks = self.by_kind.get(kind, [])
        if check_if_running:
            running = self.running(kind)
            if running is None:
                raise not_found(f"no {kind} task is running", "not_running")
            return running.view()
        if not tasks:
            raise not_found(f"no {kind} task has run in this process", "no_tasks")
        return [t.view() for t in tasks] if all_ else tasks[-1].view()

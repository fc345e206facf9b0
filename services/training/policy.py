"""When a round is due, for which model, and on which volumes.

Round 0 trains the igniter once enough labelled public volumes have arrived. After the igniter
is published, a sustainer round is due when enough clinical volumes were corrected since the
last rounds. Either waits for a quiet spell (``debounce_s``) after the last upload or
correction. A round left ``retry`` by a crash comes first. Every ``holdout_every``-th volume is
held out to validate the candidate.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from ctloop.db import RoundStatus, TrainingRound, session_scope
from ctloop.model_repository import ModelRepository
from ctloop.settings import Settings, TrainingSettings
from services.training.workflow import WorkflowClient

Plan = dict[str, list[str]]  # {"train": [...], "holdout": [...], "replay": [...]}


class NothingToTrain(RuntimeError):
    pass


def round_running(s: Session) -> bool:
    """Whether a round is running (there is at most one)."""
    running = select(TrainingRound.id).where(TrainingRound.status == RoundStatus.RUNNING)
    return s.scalar(running) is not None


class RoundPolicy:
    def __init__(self, settings: Settings, workflow: WorkflowClient, repo: ModelRepository) -> None:
        self.cfg = settings.training
        self.db = settings.database_url
        self.workflow = workflow
        self.repo = repo
        self.igniter = settings.services.igniter_model
        self.sustainer = settings.services.sustainer_model

    def due(self) -> str | None:
        """The model a round should train now, if any."""
        now = datetime.now(UTC)
        with session_scope(self.db) as s:
            if round_running(s):
                return None
            retry = s.scalars(
                select(TrainingRound).where(TrainingRound.status == RoundStatus.RETRY).limit(1)
            ).first()
            if retry is not None:
                return retry.model
            if not self.repo.published_versions(self.igniter):
                public = self.workflow.training_volumes("public", wait=False)
                last = max((v.updated for v in public), default=None)
                ready = len(public) >= self.cfg.igniter_min_volumes and _quiet(last, now, self.cfg)
                return self.igniter if ready and not self._igniter_round_open(s) else None
            trained = self._volumes_in_rounds(s, self.sustainer)
        annotated = self.workflow.training_volumes("clinical", wait=False)
        new = [v for v in annotated if v.volume_id not in trained]
        last = max((v.updated for v in annotated), default=None)
        if len(new) >= self.cfg.round_min_new and _quiet(last, now, self.cfg):
            return self.sustainer
        return None

    def plan(self, model: str) -> Plan:
        """The volumes a new round of ``model`` trains on, holds out and replays."""
        every = max(2, self.cfg.holdout_every)
        public = [v.volume_id for v in self.workflow.training_volumes("public")]
        if model == self.igniter:
            ids, replay = public, []
        else:
            ids = [v.volume_id for v in self.workflow.training_volumes("clinical")]
            replay = public[: self.cfg.public_replay]
        if not ids:
            raise NothingToTrain(f"no data for a {model} round")
        holdout = [v for i, v in enumerate(ids) if i % every == every - 1]
        train = [v for v in ids if v not in holdout]
        return {"train": train, "holdout": holdout, "replay": replay}

    def _igniter_round_open(self, s: Session) -> bool:
        """A finished igniter round that published nothing is not retried automatically."""
        found = s.scalar(
            select(TrainingRound.id).where(
                TrainingRound.model == self.igniter, TrainingRound.status != RoundStatus.RETRY
            )
        )
        return found is not None  # (round 0 has id 0)

    def _volumes_in_rounds(self, s: Session, model: str) -> set[str]:
        rows = s.scalars(
            select(TrainingRound).where(
                TrainingRound.model == model,
                TrainingRound.status.in_((RoundStatus.PUBLISHED, RoundStatus.REJECTED)),
            )
        )
        return {v for r in rows for part in ("train", "holdout") for v in r.volumes.get(part, [])}


def _quiet(last: datetime | None, now: datetime, cfg: TrainingSettings) -> bool:
    if last is None:
        return False
    if last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    return (now - last).total_seconds() >= cfg.debounce_s


class PolicyClock:
    """When the rounds' loop asks the policy next: every ``tick_s``, and as soon as the quiet
    spell after an upload or annotation event has passed (:meth:`event`), so a round that
    event makes due starts ``debounce_s`` after it rather than at the next tick."""

    def __init__(self, tick_s: float, debounce_s: float) -> None:
        self.tick_s = tick_s
        self.debounce_s = debounce_s
        self._look_at: float | None = None  # monotonic time the last event's debounce ends
        self._changed = threading.Event()
        self._lock = threading.Lock()

    def event(self) -> None:
        """An upload or annotation arrived: look again once its debounce has passed."""
        with self._lock:
            self._look_at = time.monotonic() + self.debounce_s
        self._changed.set()

    def pause(self, stop: threading.Event) -> None:
        """Wait for the next look: the tick, an event's debounce, or ``stop``."""
        end = time.monotonic() + self.tick_s
        while not stop.is_set():
            with self._lock:
                look_at = self._look_at
                now = time.monotonic()
                target = end if look_at is None else min(end, look_at)
                if now >= target:
                    if look_at is not None and look_at <= now:
                        self._look_at = None
                    return
                self._changed.clear()
            # Short waits keep ``stop`` noticed; an event wakes this at once.
            self._changed.wait(min(target - now, 0.5))

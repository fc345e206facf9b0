"""Training rounds: one at a time, each trained, validated and published or rejected.

When a round is due and on what is :mod:`services.training.policy`; the candidate's validation
and publication, :mod:`services.training.candidate`. Round 0 trains the igniter on the labelled
public volumes. Each later round fine-tunes the sustainer (from the serving sustainer, else the
igniter; from scratch if configured) on every corrected clinical volume so far plus some public
replay. A round that crashes is retried, then marked failed; a version is never half-published
(manifest last), and a round a crash left ``running`` is finished or retried at start-up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ctloop.contracts import keys
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.payloads import (
    ModelRef,
    RoundOutcome,
    model_published,
    training_completed,
    training_started,
)
from ctloop.core.blobs import nifti_array_from_gz
from ctloop.core.model import ModelConfig
from ctloop.core.train import DataSource, TrainConfig
from ctloop.db import RoundStatus, TrainingRound, claim_event, session_scope
from ctloop.log import bind
from ctloop.model_repository import ModelRepository
from ctloop.outbox import OutboxRelay, stage_event
from ctloop.settings import Settings
from ctloop.storage import ObjectStore
from ctloop.timing import Laps
from services.training.candidate import KnownMasks, publish_candidate, validate
from services.training.decathlon import materialise
from services.training.launcher import Launcher, launcher_for
from services.training.policy import (
    NothingToTrain,
    Plan,
    PolicyClock,
    RoundPolicy,
    round_running,
)
from services.training.workflow import WorkflowClient

log = logging.getLogger("ctloop.training")
CONSUMER = "training"
SOURCE = "/ctloop/training"

ROUNDS = Counter("ctloop_training_rounds_total", "Finished rounds", ["model", "outcome"])
ROUND_SECONDS = Gauge("ctloop_training_last_round_seconds", "Duration of the last round")
# What training.completed says of a round that ended (retry is not an end): else "failed".
OUTCOMES: dict[RoundStatus, RoundOutcome] = {
    RoundStatus.PUBLISHED: "published",
    RoundStatus.REJECTED: "rejected",
}


class RoundBusy(RuntimeError):
    pass


@dataclass(frozen=True)
class Trained:
    """A round's candidate checkpoint and what it started from."""

    candidate: Path
    started_from: Path | None  # the parent's weights (None: trained from scratch)
    parent: ModelRef | None


@dataclass(frozen=True)
class RoundEnd:
    """How a round ends (or pauses, for ``retry``) and what it records."""

    status: RoundStatus
    version: int | None = None
    metrics: dict[str, Any] | None = None  # None (recovery): keep what the round recorded
    reason: str = ""
    parent: ModelRef | None = None


class TrainingWorker:
    def __init__(
        self, settings: Settings, workflow: WorkflowClient, relay: OutboxRelay | None = None
    ) -> None:
        self.settings = settings
        self.workflow = workflow
        self.cfg = settings.training
        self.db = settings.database_url
        self.store = ObjectStore(settings)
        self.bucket = settings.s3.bucket
        self.repo = ModelRepository(settings, self.store)
        self.policy = RoundPolicy(settings, workflow, self.repo)
        self.clock = PolicyClock(self.cfg.tick_s, self.cfg.debounce_s)
        self.relay = relay
        self.igniter = settings.services.igniter_model
        self.sustainer = settings.services.sustainer_model
        self.work_dir = settings.data_dir / "training"
        self.launcher: Launcher = launcher_for(settings)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ events and policy
    def handle(self, event: CloudEvent) -> None:
        """Annotation and volume events only move the policy's clock (the policy looks again
        once the quiet spell after them has passed); record them as seen."""
        with session_scope(self.db) as s:
            claim_event(s, CONSUMER, event.id)
        self.clock.event()

    def run(self, stop: threading.Event) -> None:
        self.recover()
        try:
            while not stop.is_set():
                try:
                    self.launcher.prepare()
                    self.tick()
                except (RoundBusy, NothingToTrain):
                    pass
                except Exception:
                    log.exception("round policy failed; trying again later")
                self.clock.pause(stop)
        finally:
            self.launcher.close()

    def tick(self) -> TrainingRound | None:
        """Start the round the policy asks for, if any (blocking until it ends)."""
        model = self.due()
        return self.run_round(model) if model else None

    def due(self) -> str | None:
        return self.policy.due()

    # ------------------------------------------------------------ a round
    def run_round(self, model: str | None = None) -> TrainingRound:
        model = model or self.due() or self.sustainer
        if not self._lock.acquire(blocking=False):
            raise RoundBusy("a round is running")
        try:
            return self._run_round(model)
        finally:
            self._lock.release()

    def _run_round(self, model: str) -> TrainingRound:
        t0 = time.monotonic()
        number, plan, attempts = self._open_round(model)
        with bind(round=number, model=model):
            try:
                result = self._train_validate_publish(number, model, plan)
            except Exception as exc:
                log.exception("round failed", extra={"attempt": attempts})
                retry = attempts < self.cfg.max_attempts
                status = RoundStatus.RETRY if retry else RoundStatus.FAILED
                result = self._close_round(number, model, RoundEnd(status, reason=repr(exc)))
            ROUND_SECONDS.set(time.monotonic() - t0)
            return result

    def _open_round(self, model: str) -> tuple[int, Plan, int]:
        """The round to run: ``model``'s round waiting for a retry, else a new one."""
        with session_scope(self.db) as s:
            if round_running(s):
                raise RoundBusy("a round is running")
            retry = s.scalars(
                select(TrainingRound).where(
                    TrainingRound.status == RoundStatus.RETRY, TrainingRound.model == model
                )
            ).first()
            if retry is not None:
                retry.status, retry.attempts = RoundStatus.RUNNING, retry.attempts + 1
                return retry.id, dict(retry.volumes), retry.attempts
            plan = self.policy.plan(model)
            latest = s.scalar(select(func.max(TrainingRound.id)))
            number = 0 if latest is None else latest + 1
            if model == self.sustainer and number == 0:
                number = 1
            s.add(TrainingRound(id=number, model=model, status=RoundStatus.RUNNING, volumes=plan))
            started = training_started(SOURCE, round=number, model=model, volumes=plan["train"])
            stage_event(s, started)
        self._notify()
        log.info(
            "round started", extra={"round": number, "model": model, "train": len(plan["train"])}
        )
        return number, plan, 1

    def _train_validate_publish(self, number: int, model: str, plan: Plan) -> TrainingRound:
        work = self.work_dir / f"round-{number:04d}"
        laps = Laps()
        trained = self._train(number, model, plan, work, laps)
        metrics, rejection = validate(
            trained.candidate,
            trained.started_from,
            work / "holdout",
            plan["holdout"],
            self.cfg.accept_tolerance,
            self._predicted_by(trained.parent) if trained.parent else None,
        )
        laps.lap("validate")
        if rejection:
            end = RoundEnd(RoundStatus.REJECTED, metrics=metrics, reason=rejection)
            return self._close_round(number, model, end, laps)
        version = publish_candidate(
            self.repo, model, trained.candidate, number, trained.parent, metrics
        )
        laps.lap("publish")
        end = RoundEnd(RoundStatus.PUBLISHED, version, metrics, parent=trained.parent)
        return self._close_round(number, model, end, laps)

    def _predicted_by(self, version: ModelRef) -> KnownMasks:
        """The mask ``version`` pre-annotated a volume with (the inference service's stored
        prediction), or None where it has none or it cannot be read."""

        def mask(volume_id: str) -> np.ndarray | None:
            key = keys.prediction_mask(volume_id, version.model, version.version)
            try:
                raw = self.store.get_optional(self.bucket, key)
                return None if raw is None else nifti_array_from_gz(raw)[0]
            except Exception:  # only a saving: the volume is segmented instead
                log.warning("stored prediction unreadable", exc_info=True, extra={"key": key})
                return None

        return mask

    def _train(self, number: int, model: str, plan: Plan, work: Path, laps: Laps) -> Trained:
        """The round's volumes into ``work``, then the candidate trained there."""
        materialise(self.store, self.workflow, work / "train", plan["train"])
        materialise(self.store, self.workflow, work / "holdout", plan["holdout"])
        sources = [DataSource(path=work / "train")]
        if plan.get("replay"):
            materialise(self.store, self.workflow, work / "replay", plan["replay"])
            sources.append(DataSource(path=work / "replay"))
        parent = self._parent(model)
        init_from = None
        if parent is not None and not (model == self.sustainer and self.cfg.from_scratch):
            init_from = work / "parent.pt"
            init_from.write_bytes(self.repo.weights(parent.model, parent.version))
        laps.lap("materialise")
        config = TrainConfig(
            model=ModelConfig.model_validate(self.cfg.model),
            sources=sources,
            out=work / "candidate.pt",
            init_from=init_from,
            steps=self.cfg.igniter_steps if model == self.igniter else self.cfg.sustainer_steps,
            lr=2e-3 if init_from is None else 1e-3,
            seed=number,
            meta={"name": model, "round": number},
        )
        self._torchrun(config, work)
        laps.lap("train")
        return Trained(config.out, init_from, parent)

    def _close_round(
        self, number: int, model: str, end: RoundEnd, laps: Laps | None = None
    ) -> TrainingRound:
        """Record how the round ended and stage its events in the same transaction; the log
        line says where the round's time went (``laps``: materialise, train, validate,
        publish, close)."""
        with session_scope(self.db) as s:
            row = s.get(TrainingRound, number)
            assert row is not None
            metrics = dict(row.metrics) if end.metrics is None else end.metrics
            row.status, row.version, row.metrics = end.status, end.version, metrics
            row.reason = end.reason
            if end.status != RoundStatus.RETRY:
                row.finished_at = datetime.now(UTC)
                self._stage_round_end(s, number, model, end, metrics)
            s.flush()
            s.expunge(row)
        self._notify()
        if laps is not None:
            laps.lap("close")
        log.info(
            "round finished",
            extra={
                "status": end.status,
                "version": end.version,
                "seconds": {k: round(v, 3) for k, v in (laps.seconds if laps else {}).items()},
                **{k: v for k, v in metrics.items() if k.endswith("dice")},
            },
        )
        return row

    def _stage_round_end(
        self, s: Session, number: int, model: str, end: RoundEnd, metrics: dict[str, Any]
    ) -> None:
        """``training.completed``, and ``model.published`` when the round published."""
        outcome = OUTCOMES.get(end.status, "failed")
        done = training_completed(
            SOURCE,
            round=number,
            model=model,
            outcome=outcome,
            version=end.version,
            metrics=metrics,
            reason=end.reason,
        )
        stage_event(s, done)
        ROUNDS.labels(model, outcome).inc()
        if end.status == RoundStatus.PUBLISHED and end.version is not None:
            published = model_published(
                SOURCE,
                model=ModelRef(model=model, version=end.version),
                parent=end.parent,
                manifest=self.repo.manifest_ref(model, end.version),
                metrics=metrics,
                round=number,
            )
            stage_event(s, published)

    def recover(self) -> None:
        """A round left ``running`` by a crash: finish it if its version got published (the
        manifest names the round), else retry it."""
        with session_scope(self.db) as s:
            running = select(TrainingRound).where(TrainingRound.status == RoundStatus.RUNNING)
            stale = [(r.id, r.model) for r in s.scalars(running)]
        for number, model in stale:
            for version in reversed(self.repo.published_versions(model)):
                if self.repo.manifest(model, version).get("round") == number:
                    self._close_round(number, model, RoundEnd(RoundStatus.PUBLISHED, version))
                    break
            else:
                with session_scope(self.db) as s:
                    row = s.get(TrainingRound, number)
                    if row is not None:
                        row.status = RoundStatus.RETRY

    # ------------------------------------------------------------ helpers
    def _parent(self, model: str) -> ModelRef | None:
        for name in (self.sustainer, self.igniter) if model == self.sustainer else ():
            versions = self.repo.published_versions(name)
            if versions:
                return ModelRef(model=name, version=versions[-1])
        return None

    def _torchrun(self, config: TrainConfig, work: Path) -> None:
        """Train the candidate: torchrun here, or a Kubernetes Job (``training.launcher``)."""
        self.launcher.run(config, work)

    def progress(self, number: int) -> tuple[int, int]:
        """(step, steps) of a running round, from rank 0's log (0, 0 when not known yet)."""
        log_path = self.work_dir / f"round-{number:04d}" / "train.log"
        try:
            with open(log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                tail = f.read().decode(errors="replace").splitlines()
        except OSError:
            return 0, 0
        for line in reversed(tail):
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec and "steps" in rec:
                return int(rec["step"]), int(rec["steps"])
        return 0, 0

    def _notify(self) -> None:
        if self.relay is not None:
            self.relay.notify()

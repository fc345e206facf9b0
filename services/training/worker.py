"""Training rounds: when to train, on what, and what gets published.

Round 0 trains the igniter on the labelled public volumes. Each later round fine-tunes the
sustainer (from the serving sustainer, else the igniter; from scratch if configured) on every
corrected clinical volume so far plus some public replay. Every ``holdout_every``-th volume is
held out; the candidate is published only if its held-out Dice is not worse than the serving
model's (the decision and numbers are recorded). One round at a time; a round that crashes is
retried, then marked failed; a version is never half-published (manifest last).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from prometheus_client import Counter, Gauge
from sqlalchemy import func, select

from ctloop.contracts.events import CloudEvent
from ctloop.contracts.payloads import (
    BlobRef,
    ModelRef,
    RoundOutcome,
    model_published,
    training_completed,
    training_started,
)
from ctloop.core.blobs import nifti_from_gz
from ctloop.core.datasets import Volume as CoreVolume
from ctloop.core.datasets import write_decathlon
from ctloop.core.infer import Segmenter
from ctloop.core.metrics import mean_dice
from ctloop.core.model import ModelConfig
from ctloop.core.packaging import package_checkpoint, segmentation_spec
from ctloop.core.train import DataSource, TrainConfig
from ctloop.db import RoundStatus, TrainingRound, claim_event, session_scope
from ctloop.log import bind
from ctloop.model_repository import ModelRepository
from ctloop.outbox import OutboxRelay, stage_event
from ctloop.settings import Settings
from ctloop.storage import ObjectStore
from services.training.launcher import Launcher, launcher_for
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


class NothingToTrain(RuntimeError):
    pass


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
        self.relay = relay
        self.igniter = settings.services.igniter_model
        self.sustainer = settings.services.sustainer_model
        self.work_dir = settings.data_dir / "training"
        self.launcher: Launcher = launcher_for(settings)
        self._lock = threading.Lock()

    # ------------------------------------------------------------ events and policy
    def handle(self, event: CloudEvent) -> None:
        """Annotation and volume events only move the policy's clock; record them as seen."""
        with session_scope(self.db) as s:
            claim_event(s, CONSUMER, event.id)

    def run(self, stop: threading.Event) -> None:
        self.recover()
        while not stop.is_set():
            try:
                self.tick()
            except (RoundBusy, NothingToTrain):
                pass
            except Exception:
                log.exception("round policy failed; trying again later")
            stop.wait(self.cfg.tick_s)

    def tick(self) -> TrainingRound | None:
        """Start the round the policy asks for, if any (blocking until it ends)."""
        model = self.due()
        return self.run_round(model) if model else None

    def due(self) -> str | None:
        now = datetime.now(UTC)
        with session_scope(self.db) as s:
            if (
                s.scalar(
                    select(TrainingRound.id).where(TrainingRound.status == RoundStatus.RUNNING)
                )
                is not None
            ):
                return None
            retry = s.scalars(
                select(TrainingRound).where(TrainingRound.status == RoundStatus.RETRY).limit(1)
            ).first()
            if retry is not None:
                return retry.model
            if not self.repo.published_versions(self.igniter):
                public = self.workflow.training_volumes("public")
                last = max((v.updated for v in public), default=None)
                ready = len(public) >= self.cfg.igniter_min_volumes and _quiet(last, now, self.cfg)
                return self.igniter if ready and not self._igniter_round_open(s) else None
            trained = self._volumes_in_rounds(s, self.sustainer)
        annotated = self.workflow.training_volumes("clinical")
        new = [v for v in annotated if v.volume_id not in trained]
        last = max((v.updated for v in annotated), default=None)
        if len(new) >= self.cfg.round_min_new and _quiet(last, now, self.cfg):
            return self.sustainer
        return None

    def _igniter_round_open(self, s: Any) -> bool:
        """A finished igniter round that published nothing is not retried automatically."""
        found = s.scalar(
            select(TrainingRound.id).where(
                TrainingRound.model == self.igniter, TrainingRound.status != RoundStatus.RETRY
            )
        )
        return found is not None  # (round 0 has id 0)

    def _volumes_in_rounds(self, s: Any, model: str) -> set[str]:
        rows = s.scalars(
            select(TrainingRound).where(
                TrainingRound.model == model,
                TrainingRound.status.in_((RoundStatus.PUBLISHED, RoundStatus.REJECTED)),
            )
        )
        return {v for r in rows for part in ("train", "holdout") for v in r.volumes.get(part, [])}

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
                status = (
                    RoundStatus.RETRY if attempts < self.cfg.max_attempts else RoundStatus.FAILED
                )
                result = self._close_round(number, model, status, reason=repr(exc))
            ROUND_SECONDS.set(time.monotonic() - t0)
            return result

    def _open_round(self, model: str) -> tuple[int, dict[str, list[str]], int]:
        with session_scope(self.db) as s:
            if (
                s.scalar(
                    select(TrainingRound.id).where(TrainingRound.status == RoundStatus.RUNNING)
                )
                is not None
            ):
                raise RoundBusy("a round is running")
            retry = s.scalars(
                select(TrainingRound).where(
                    TrainingRound.status == RoundStatus.RETRY, TrainingRound.model == model
                )
            ).first()
            if retry is not None:
                retry.status, retry.attempts = RoundStatus.RUNNING, retry.attempts + 1
                return retry.id, dict(retry.volumes), retry.attempts
            plan = self._plan(model)
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

    def _plan(self, model: str) -> dict[str, list[str]]:
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

    def _train_validate_publish(
        self, number: int, model: str, plan: dict[str, list[str]]
    ) -> TrainingRound:
        work = self.work_dir / f"round-{number:04d}"
        self._materialise(work / "train", plan["train"])
        self._materialise(work / "holdout", plan["holdout"])
        sources = [DataSource(path=work / "train")]
        if plan.get("replay"):
            self._materialise(work / "replay", plan["replay"])
            sources.append(DataSource(path=work / "replay"))

        parent = self._parent(model)
        init_from = None
        if parent is not None and not (model == self.sustainer and self.cfg.from_scratch):
            init_from = work / "parent.pt"
            init_from.write_bytes(self.repo.weights(parent.model, parent.version))
        candidate = work / "candidate.pt"
        config = TrainConfig(
            model=ModelConfig.model_validate(self.cfg.model),
            sources=sources,
            out=candidate,
            init_from=init_from,
            steps=self.cfg.igniter_steps if model == self.igniter else self.cfg.sustainer_steps,
            lr=2e-3 if init_from is None else 1e-3,
            seed=number,
            meta={"name": model, "round": number},
        )
        self._torchrun(config, work)

        metrics: dict[str, Any] = {"holdout": plan["holdout"]}
        metrics["candidate_dice"] = self._holdout_dice(candidate, work / "holdout")
        if init_from is not None and plan["holdout"]:
            metrics["serving_dice"] = self._holdout_dice(init_from, work / "holdout")
        accept = (
            metrics.get("serving_dice") is None
            or metrics["candidate_dice"] is None
            or metrics["candidate_dice"] >= metrics["serving_dice"] - self.cfg.accept_tolerance
        )
        if not accept:
            return self._close_round(
                number,
                model,
                RoundStatus.REJECTED,
                metrics=metrics,
                reason=f"held-out Dice {metrics['candidate_dice']:.4f} < serving "
                f"{metrics['serving_dice']:.4f}",
            )
        version = max(self.repo.published_versions(model), default=0) + 1
        spec = segmentation_spec(model)
        package = package_checkpoint(
            candidate, spec, parent_version=parent.version if parent else None, metrics=metrics
        )
        manifest = {
            **package.manifest,
            "round": number,
            "parent": parent.model_dump() if parent else None,
        }
        self.repo.publish_version(spec, version, package.files, manifest)
        return self._close_round(
            number, model, RoundStatus.PUBLISHED, version=version, metrics=metrics, parent=parent
        )

    def _close_round(
        self,
        number: int,
        model: str,
        status: RoundStatus,
        version: int | None = None,
        metrics: dict[str, Any] | None = None,
        reason: str = "",
        parent: ModelRef | None = None,
    ) -> TrainingRound:
        with session_scope(self.db) as s:
            row = s.get(TrainingRound, number)
            assert row is not None
            if metrics is None:  # (recovery) keep what the round recorded
                metrics = dict(row.metrics)
            row.status, row.version, row.metrics, row.reason = status, version, metrics, reason
            if status != RoundStatus.RETRY:
                row.finished_at = datetime.now(UTC)
                outcome = OUTCOMES.get(status, "failed")
                done = training_completed(
                    SOURCE,
                    round=number,
                    model=model,
                    outcome=outcome,
                    version=version,
                    metrics=metrics,
                    reason=reason,
                )
                stage_event(s, done)
                ROUNDS.labels(model, outcome).inc()
            if status == RoundStatus.PUBLISHED and version is not None:
                published = model_published(
                    SOURCE,
                    model=ModelRef(model=model, version=version),
                    parent=parent,
                    manifest=self.repo.manifest_ref(model, version),
                    metrics=metrics,
                    round=number,
                )
                stage_event(s, published)
            s.flush()
            s.expunge(row)
        self._notify()
        log.info(
            "round finished",
            extra={
                "status": status,
                "version": version,
                **{k: v for k, v in metrics.items() if k.endswith("dice")},
            },
        )
        return row

    def recover(self) -> None:
        """A round left ``running`` by a crash: finish it if its version got published (the
        manifest names the round), else retry it."""
        with session_scope(self.db) as s:
            stale = [
                (r.id, r.model)
                for r in s.scalars(
                    select(TrainingRound).where(TrainingRound.status == RoundStatus.RUNNING)
                )
            ]
        for number, model in stale:
            for version in reversed(self.repo.published_versions(model)):
                if self.repo.manifest(model, version).get("round") == number:
                    self._close_round(number, model, RoundStatus.PUBLISHED, version=version)
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

    def _materialise(self, root: Path, volume_ids: list[str]) -> None:
        """Volumes (with their label or latest annotation and its review) as a Decathlon folder."""
        known = {
            v.volume_id: v
            for dataset in ("public", "clinical")
            for v in self.workflow.training_volumes(dataset)
        }
        volumes, partial = [], {}
        for vid in volume_ids:
            if vid not in known:
                raise NothingToTrain(f"{vid} has neither a label nor an annotation")
            tv = known[vid]
            image = self._load(tv.image)
            label = self._load(tv.label)
            volumes.append(
                CoreVolume(
                    id=vid,
                    image=np.asarray(image.dataobj, np.float32),
                    affine=np.asarray(image.affine),
                    label=np.asarray(label.dataobj, np.uint8),
                )
            )
            if tv.review:
                partial[vid] = tv.review
        write_decathlon(root, volumes, name=root.name)
        if partial:
            spec_path = root / "dataset.json"
            spec = json.loads(spec_path.read_text())
            for entry in spec["training"]:
                vid = Path(entry["image"]).name.removesuffix(".nii.gz")
                if vid in partial:
                    entry["partial"] = partial[vid]
            spec_path.write_text(json.dumps(spec, indent=2))

    def _load(self, ref: BlobRef) -> nib.Nifti1Image:
        raw = self.store.get_bytes(ref.bucket, ref.key, ref.version_id)
        return nifti_from_gz(raw)

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

    def _holdout_dice(self, checkpoint: Path, folder: Path) -> float | None:
        from ctloop.core.datasets import DecathlonDataset

        ds = DecathlonDataset.open(folder)
        if len(ds) == 0:
            return None
        seg = Segmenter(checkpoint)
        scores = [
            mean_dice(seg(v.image, v.affine).label, v.label) for v in ds if v.label is not None
        ]
        return float(np.mean(scores)) if scores else None

    def _notify(self) -> None:
        if self.relay is not None:
            self.relay.notify()


def _quiet(last: datetime | None, now: datetime, cfg: Any) -> bool:
    if last is None:
        return False
    if last.tzinfo is None:
        last = last.replace(tzinfo=UTC)
    return (now - last).total_seconds() >= cfg.debounce_s

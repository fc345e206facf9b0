"""Per-round quality and effort, rebuilt from the event history.

A "round" here is the model version whose pre-annotations the annotators corrected: for each
``annotation.submitted`` that names ``from_model``, the Dice between that version's
pre-annotation and the correction (over the organs and slices the annotator reviewed) and the
minutes it took. Replayed events are counted once.

Independently of the annotators, every model version that pre-annotates an *evaluation* volume
(clinical volumes uploaded with reference labels, never trained on) is scored against that label:
the Dice per organ and mean on the clinical data that the report compares across rounds. A
*public-test* volume (labelled, of the public site, never trained on) is scored the same way
and reported apart: how much a sustainer forgets of the public site.

The state is kept through restarts as a :class:`StateDoc` (services/metrics/snapshot.py writes
it to S3 with the offsets it covers). Events that Kafka deleted before a snapshot covered them
are recorded as gaps: from then on the report says it may be incomplete.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import Counter, Gauge

from ctloop.contracts import keys
from ctloop.contracts.events import CloudEvent
from ctloop.contracts.payloads import (
    SCORED_DATASETS,
    AnnotationSubmitted,
    ModelPublished,
    PredictionCompleted,
    TrainingCompleted,
    VolumeIngested,
    payload_for,
)
from ctloop.core.blobs import nifti_from_gz
from ctloop.core.metrics import mean_dice, organ_dice
from ctloop.core.partial import PartialLabel
from ctloop.storage import ObjectStore
from services.metrics.snapshot_format import (
    HistoryGap,
    PredictionDoc,
    RoundDoc,
    RoundOfDoc,
    ScoreDoc,
    StateDoc,
)

log = logging.getLogger("ctloop.metrics")

EVENTS = Counter("ctloop_metrics_events_total", "Events folded into the metrics", ["type"])
ROUND_DICE = Gauge("ctloop_round_mean_dice", "Pre-annotation vs correction", ["model", "version"])
ROUND_MINUTES = Gauge(
    "ctloop_round_minutes_per_ct", "Annotation minutes per CT", ["model", "version"]
)
ROUND_VOLUMES = Gauge("ctloop_round_volumes_annotated", "Volumes annotated", ["model", "version"])
EVAL_DICE = Gauge(
    "ctloop_evaluation_mean_dice", "Mean Dice on the evaluation volumes", ["model", "version"]
)
HISTORY_COMPLETE = Gauge(
    "ctloop_metrics_history_complete",
    "1 unless events were deleted from Kafka before a snapshot covered them",
)
MISSING_OFFSETS = Gauge(
    "ctloop_metrics_missing_offsets",
    "Offsets deleted from Kafka before a snapshot covered them",
    ["topic", "partition"],
)
HISTORY_COMPLETE.set(1)


@dataclass
class RoundStats:
    model: str
    version: int
    round: int = -1
    minutes: list[float] = field(default_factory=list)
    dice: list[float] = field(default_factory=list)
    organ_dice: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    volumes: set[str] = field(default_factory=set)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "round": self.round,
            "volumes_annotated": len(self.volumes),
            "minutes_per_ct": float(np.mean(self.minutes)) if self.minutes else 0.0,
            "mean_dice": float(np.mean(self.dice)) if self.dice else 0.0,
            "organ_dice": {o: float(np.mean(v)) for o, v in sorted(self.organ_dice.items())},
        }


class MetricsState:
    def __init__(self, store: ObjectStore, bucket: str) -> None:
        self.store = store
        self.bucket = bucket
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._predictions: dict[tuple[str, str, int], tuple[str, str, str | None]] = {}
        self._rounds: dict[tuple[str, int], RoundStats] = {}
        self._round_of: dict[tuple[str, int], int] = {}
        self._evaluation: dict[str, tuple[str, str, str | None]] = {}  # volume -> its label
        self._dataset: dict[str, str] = {}  # scored volume -> its dataset, when not "evaluation"
        # (model, version) -> volume -> (mean Dice, Dice per organ)
        self._scores: dict[tuple[str, int], dict[str, tuple[float, dict[str, float]]]] = {}
        self._gaps: list[HistoryGap] = []
        self.events_seen = 0

    def handle(self, event: CloudEvent) -> None:
        """Apply an event once. An event whose effect failed half-way (a mask S3 could not
        give) is not marked seen, so its redelivery applies it instead of skipping it."""
        with self._lock:
            if event.id in self._seen:
                return
            self._seen.add(event.id)
            self.events_seen += 1
        try:
            self._apply(event)
        except BaseException:
            with self._lock:
                self._seen.discard(event.id)
                self.events_seen -= 1
            raise
        EVENTS.labels(event.type.name).inc()

    def _apply(self, event: CloudEvent) -> None:
        payload = payload_for(event)
        if isinstance(payload, PredictionCompleted):
            key = (payload.volume_id, payload.model.model, payload.model.version)
            with self._lock:
                self._predictions[key] = (
                    payload.mask.bucket,
                    payload.mask.key,
                    payload.mask.version_id,
                )
                label = self._evaluation.get(payload.volume_id)
            if label is not None:
                self._score(payload.volume_id, key[1:], key_of(payload.mask), label)
        elif isinstance(payload, VolumeIngested) and payload.dataset in SCORED_DATASETS:
            if payload.label is None:
                return
            label = key_of(payload.label)
            with self._lock:
                self._evaluation[payload.volume_id] = label
                if payload.dataset != "evaluation":
                    self._dataset[payload.volume_id] = payload.dataset
                # The volume's predictions may have been seen first (topics are not ordered).
                seen = [
                    (k[1:], m) for k, m in self._predictions.items() if k[0] == payload.volume_id
                ]
            for ref, mask in seen:
                self._score(payload.volume_id, ref, mask, label)
        elif isinstance(payload, ModelPublished) and payload.round is not None:
            with self._lock:
                self._round_of[(payload.model.model, payload.model.version)] = payload.round
        elif isinstance(payload, AnnotationSubmitted):
            self._annotation(payload)
        elif isinstance(payload, TrainingCompleted) and payload.version is not None:
            with self._lock:
                self._round_of[(payload.model, payload.version)] = payload.round

    def _annotation(self, a: AnnotationSubmitted) -> None:
        """The annotation's minutes and the Dice of its pre-annotation against the correction.
        Every blob is read before the state changes, so a failed read leaves nothing half-done
        (the event's redelivery applies it whole)."""
        if a.from_model is None:
            return
        ref = (a.from_model.model, a.from_model.version)
        with self._lock:
            seen = self._predictions.get((a.volume_id, *ref))
        # Topics are not ordered with each other: the pre-annotation's key is known without its
        # event (S3 is the source of truth for blobs).
        prediction = seen or (self.bucket, keys.prediction_mask(a.volume_id, *ref), None)
        per: dict[str, float] = {}
        if self.store.exists(prediction[0], prediction[1]):
            pred = self._mask(*prediction)
            corrected = self._mask(a.mask.bucket, a.mask.key, a.mask.version_id)
            review = PartialLabel(organs=a.organs, reviewed_slices=a.reviewed_slices)
            rows = review.slice_mask(corrected.shape[2])
            per = organ_dice(pred[:, :, rows], corrected[:, :, rows])
            per = {o: d for o, d in per.items() if a.organs.get(o) != "skipped"}
        else:
            log.warning("no pre-annotation for this annotation", extra={"volume_id": a.volume_id})
        with self._lock:
            stats = self._rounds.setdefault(ref, RoundStats(*ref))
            stats.minutes.append(a.minutes)
            stats.volumes.add(a.volume_id)
            for organ, d in per.items():
                stats.organ_dice[organ].append(d)
            if per:
                stats.dice.append(float(np.mean(list(per.values()))))

    def _score(
        self,
        volume_id: str,
        ref: tuple[str, int],
        mask: tuple[str, str, str | None],
        label: tuple[str, str, str | None],
    ) -> None:
        pred, truth = self._mask(*mask), self._mask(*label)
        score = (mean_dice(pred, truth), organ_dice(pred, truth))
        with self._lock:
            self._scores.setdefault(ref, {})[volume_id] = score

    def evaluation(self, dataset: str = "evaluation") -> list[dict[str, Any]]:
        """Per model version: Dice on the scored volumes of ``dataset`` (evaluation, or
        public-test), mean over volumes and organs."""
        with self._lock:
            scores = {
                ref: {
                    vid: score
                    for vid, score in per.items()
                    if self._dataset.get(vid, "evaluation") == dataset
                }
                for ref, per in self._scores.items()
            }
        out = []
        for (model, version), per_volume in sorted(scores.items()):
            if not per_volume:
                continue
            organs: dict[str, list[float]] = defaultdict(list)
            for _, per_organ in per_volume.values():
                for organ, d in per_organ.items():
                    organs[organ].append(d)
            mean = float(np.mean([m for m, _ in per_volume.values()]))
            if dataset == "evaluation":
                EVAL_DICE.labels(model, str(version)).set(mean)
            out.append(
                {
                    "model": model,
                    "version": version,
                    "volumes": len(per_volume),
                    "mean_dice": mean,
                    "organ_dice": {o: float(np.mean(v)) for o, v in sorted(organs.items())},
                }
            )
        return out

    def _mask(self, bucket: str, key: str, version: str | None) -> np.ndarray:
        raw = self.store.get_bytes(bucket, key, version)
        return np.asarray(nifti_from_gz(raw).dataobj, dtype=np.uint8)

    def report(self) -> list[dict[str, Any]]:
        with self._lock:
            rounds = []
            for ref, stats in sorted(
                self._rounds.items(), key=lambda kv: (kv[0][0] != "igniter", kv[0])
            ):
                stats.round = self._round_of.get(ref, -1)
                summary = stats.summary()
                labels = (ref[0], str(ref[1]))
                ROUND_DICE.labels(*labels).set(summary["mean_dice"])
                ROUND_MINUTES.labels(*labels).set(summary["minutes_per_ct"])
                ROUND_VOLUMES.labels(*labels).set(summary["volumes_annotated"])
                rounds.append(summary)
        return rounds

    def note_gap(self, gap: HistoryGap) -> None:
        """Events that were deleted before they were folded in: the report is incomplete."""
        log.warning(
            "events were deleted from Kafka before a snapshot covered them: the report may be "
            "incomplete",
            extra=gap.model_dump() | {"missing": gap.first_kept - gap.first_missing},
        )
        with self._lock:
            self._gaps.append(gap)
            _expose_gaps(self._gaps)

    def history(self) -> dict[str, Any]:
        """Whether every event this state needed was read (``complete``), and which were not."""
        with self._lock:
            gaps = [g.model_dump() for g in self._gaps]
        return {"complete": not gaps, "gaps": gaps}

    def export(self) -> StateDoc:
        with self._lock:
            return StateDoc(
                events_seen=self.events_seen,
                seen=sorted(self._seen),
                predictions=[
                    PredictionDoc(volume_id=v, model=m, version=n, mask=mask)
                    for (v, m, n), mask in self._predictions.items()
                ],
                rounds=[_round_doc(s) for s in self._rounds.values()],
                round_of=[
                    RoundOfDoc(model=m, version=v, round=r) for (m, v), r in self._round_of.items()
                ],
                evaluation=dict(self._evaluation),
                scored_datasets=dict(self._dataset),
                scores=[
                    ScoreDoc(model=m, version=n, volume_id=v, mean_dice=mean, organ_dice=organs)
                    for (m, n), per in self._scores.items()
                    for v, (mean, organs) in per.items()
                ],
                gaps=list(self._gaps),
            )

    def restore(self, doc: StateDoc) -> None:
        """Replace everything with ``doc`` (at start, before any event is handled)."""
        with self._lock:
            self.events_seen = doc.events_seen
            self._seen = set(doc.seen)
            self._predictions = {(p.volume_id, p.model, p.version): p.mask for p in doc.predictions}
            self._rounds = {(r.model, r.version): _round_stats(r) for r in doc.rounds}
            self._round_of = {(r.model, r.version): r.round for r in doc.round_of}
            self._evaluation = dict(doc.evaluation)
            self._dataset = dict(doc.scored_datasets)
            self._scores = {}
            for s in doc.scores:
                per = self._scores.setdefault((s.model, s.version), {})
                per[s.volume_id] = (s.mean_dice, dict(s.organ_dice))
            self._gaps = list(doc.gaps)
            _expose_gaps(self._gaps)


def _round_doc(stats: RoundStats) -> RoundDoc:
    return RoundDoc(
        model=stats.model,
        version=stats.version,
        minutes=list(stats.minutes),
        dice=list(stats.dice),
        organ_dice={o: list(d) for o, d in stats.organ_dice.items()},
        volumes=sorted(stats.volumes),
    )


def _round_stats(doc: RoundDoc) -> RoundStats:
    stats = RoundStats(doc.model, doc.version, minutes=list(doc.minutes), dice=list(doc.dice))
    for organ, dice in doc.organ_dice.items():
        stats.organ_dice[organ].extend(dice)
    stats.volumes.update(doc.volumes)
    return stats


def _expose_gaps(gaps: list[HistoryGap]) -> None:
    HISTORY_COMPLETE.set(0 if gaps else 1)
    missing: dict[tuple[str, str], int] = defaultdict(int)
    for g in gaps:
        missing[(g.topic, str(g.partition))] += g.first_kept - g.first_missing
    for labels, count in missing.items():
        MISSING_OFFSETS.labels(*labels).set(count)


def key_of(ref: Any) -> tuple[str, str, str | None]:
    return (ref.bucket, ref.key, ref.version_id)

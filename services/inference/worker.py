"""Pre-annotation: the inference service's event handlers and its on-demand ``Segment``.

- ``volume.ingested`` (clinical): segment with the serving model through Triton, write the mask
  to S3, record the prediction and stage ``prediction.completed`` in one transaction.
- ``model.published``: load that exact version on every Triton replica; if a load fails the old
  version keeps serving. Then re-predict every volume still waiting for annotation, most
  uncertain first. The service's reconciling loads what serves on replicas that lack it.

Which model serves: the newest loaded sustainer once one exists, else the igniter.
Every handler claims its event id in the same transaction as its effect (idempotent).
The volume's status is not written here: a prediction row makes it read as predicted
(:func:`ctloop.db.volume_status`).
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

from prometheus_client import Counter, Histogram
from sqlalchemy import select

from ctloop.contracts import keys
from ctloop.contracts.events import CloudEvent, UnknownSubject
from ctloop.contracts.payloads import (
    SCORED_DATASETS,
    BlobRef,
    ModelPublished,
    ModelRef,
    VolumeIngested,
    payload_for,
    prediction_completed,
)
from ctloop.core.blobs import nifti_array_from_gz, nifti_gz_bytes
from ctloop.core.infer import PreparedVolume
from ctloop.db import (
    Prediction,
    ServingModel,
    Volume,
    claim_event,
    event_claimed,
    in_the_loop,
    session_scope,
    waiting_for_annotation,
)
from ctloop.log import bind
from ctloop.model_repository import ModelLoadFailed, ModelRepository
from ctloop.outbox import OutboxRelay, stage_event
from ctloop.settings import Settings
from ctloop.storage import ObjectStore
from ctloop.timing import Laps
from ctloop.triton_serving import IncompatibleModel, TritonModels, TritonSegmenter

log = logging.getLogger("ctloop.inference")
CONSUMER = "inference"
SOURCE = "/ctloop/inference"

PREDICTIONS = Counter("ctloop_predictions_total", "Pre-annotations written", ["model"])
PREDICT_SECONDS = Histogram("ctloop_prediction_seconds", "Time to pre-annotate one volume")
LOAD_FAILURES = Counter("ctloop_model_load_failures_total", "Model versions Triton refused")


@dataclass(frozen=True)
class StoredVolume:
    """Where a volume's image is stored."""

    site: str
    key: str
    version: str | None


@dataclass(frozen=True)
class PredictionResult:
    volume_id: str
    model: ModelRef
    mask: BlobRef
    uncertainty: float
    seconds: float


class InferenceWorker:
    def __init__(
        self,
        settings: Settings,
        triton: TritonModels,
        relay: OutboxRelay | None = None,
        repository: ModelRepository | None = None,
    ) -> None:
        self.settings = settings
        self.db = settings.database_url
        self.store = ObjectStore(settings)
        self.bucket = settings.s3.bucket
        self.triton = triton
        self.repository = repository or ModelRepository(settings, self.store)
        # Resampling here, the network in Triton: only model-grid tensors cross to Triton.
        self.segmenter = TritonSegmenter(triton, self.repository)
        self.relay = relay
        self.preference = (settings.services.sustainer_model, settings.services.igniter_model)
        self._serving_change = threading.Lock()  # loads of what serves, one at a time
        # Model inputs written to S3 while the network runs (see _prepared).
        self._keeping = ThreadPoolExecutor(max_workers=1, thread_name_prefix="keep")

    # ------------------------------------------------------------ events
    def handle(self, event: CloudEvent) -> None:
        payload = payload_for(event)
        if isinstance(payload, VolumeIngested):
            self.on_volume_ingested(event.id, payload)
        elif isinstance(payload, ModelPublished):
            self.on_model_published(event.id, payload)

    def on_volume_ingested(self, event_id: str, v: VolumeIngested) -> None:
        if v.dataset == "public":
            self._mark_done(event_id)  # labelled training volumes need no pre-annotation
            return
        with session_scope(self.db) as s:
            ours = s.get(Volume, v.volume_id) is not None
        if not ours:
            # Ingest commits the row before the event leaves the outbox: a volume missing here
            # belongs to another platform instance on the same cluster (e.g. a replayed topic).
            log.info("volume of another platform; ignored", extra={"volume_id": v.volume_id})
            self._mark_done(event_id)
            return
        serving = self.serving()
        if serving is None:
            log.info("no model serves yet; volume waits", extra={"volume_id": v.volume_id})
            self._mark_done(event_id)
            return
        self.predict(v.volume_id, serving, event_id=event_id)

    def on_model_published(self, event_id: str, m: ModelPublished) -> None:
        if m.model.model not in self.preference:
            self._mark_done(event_id)  # another platform's model (or an unconfigured one)
            return
        with self._serving_change, session_scope(self.db) as s:
            if not claim_event(s, CONSUMER, event_id):
                return
            row = s.get(ServingModel, m.model.model, with_for_update=True)
            ok = self._load(m.model)
            if ok:
                if row is None:
                    s.add(ServingModel(model=m.model.model, version=m.model.version))
                elif m.model.version >= row.version or m.rollback:
                    row.version = m.model.version
        if ok:
            self.repredict_waiting()

    # ------------------------------------------------------------ serving
    def _load(self, ref: ModelRef) -> bool:
        with bind(model=ref.model, model_version=ref.version):
            try:
                self.segmenter.preprocessor(ref.model, ref.version)  # its manifest fits
                # sends Triton the version's files, each checked against the manifest
                self.segmenter.serve_version(ref.model, ref.version)
            except (ModelLoadFailed, IncompatibleModel):
                LOAD_FAILURES.inc()
                log.exception("new version failed to load; the previous one keeps serving")
                return False
            log.info("model version loaded")
            return True

    def serving(self) -> ModelRef | None:
        with session_scope(self.db) as s:
            rows = {r.model: r.version for r in s.scalars(select(ServingModel))}
        for name in self.preference:
            if name in rows:
                return ModelRef(model=name, version=rows[name])
        return None

    def ensure_loaded(self) -> int:
        """Load what the database says serves on every Triton replica that lacks it: after
        this service restarts, a Triton replica restarts (it comes up with nothing loaded) or
        a new one starts. The number of loads it made."""
        # Never while a model.published handler loads the version that replaces one of these
        # (it would be loaded back): this process's lock, and the rows' locks for the other
        # replicas of this service (PostgreSQL; SQLite is one process).
        with self._serving_change, session_scope(self.db) as s:
            rows = list(s.scalars(select(ServingModel).with_for_update()))
            refs = [ModelRef(model=r.model, version=r.version) for r in rows]
            return sum(self._load_where_missing(ref) for ref in refs)

    def _load_where_missing(self, ref: ModelRef) -> int:
        loaded = 0
        with bind(model=ref.model, model_version=ref.version):
            try:
                spec = self.segmenter.spec(ref.model, ref.version)
                # CPU replicas serve a version of interface 4 beside the pipeline model.
                split = self.segmenter.split(ref.model, ref.version)
                loads = self.segmenter.ensure_pipeline() if split else []
            except (ModelLoadFailed, IncompatibleModel):
                LOAD_FAILURES.inc()
                log.exception("serving version cannot be loaded; trying again later")
                return 0
            # What a replica loads must still be what was published: checked before a load.
            verify = functools.partial(self.segmenter.files, ref.model, ref.version)
            for done in [*loads, *self.triton.load_where_missing(spec, ref.version, verify)]:
                if done.error is None:
                    loaded += 1
                    log.info("serving version loaded on a replica", extra={"replica": done.replica})
                    continue
                if done.refused:  # a replica that is down refused nothing
                    LOAD_FAILURES.inc()
                log.warning(
                    "serving version not loaded on a replica; trying again later",
                    extra={"replica": done.replica, "error": done.error},
                )
        return loaded

    def waiting_volumes(self) -> list[str]:
        """Volumes waiting for annotation: never predicted first, then the latest
        pre-annotation's uncertainty, highest first."""
        with session_scope(self.db) as s:
            rows = list(s.execute(waiting_for_annotation()).all())
        rows.sort(key=lambda r: (r.uncertainty is not None, -(r.uncertainty or 0.0), r.created_at))
        with session_scope(self.db) as s:
            # Evaluation (and public test) volumes are scored against every model that serves:
            # after the waiting.
            scored = s.scalars(
                select(Volume.id)
                .where(Volume.dataset.in_(SCORED_DATASETS), in_the_loop())
                .order_by(Volume.created_at)
            )
            return [r.id for r in rows] + list(scored)

    def repredict_waiting(self) -> int:
        serving = self.serving()
        if serving is None:
            return 0
        done = 0
        for volume_id in self.waiting_volumes():
            if self.predict(volume_id, serving) is not None:
                done += 1
        return done

    # ------------------------------------------------------------ prediction
    def predict(
        self, volume_id: str, model: ModelRef, event_id: str | None = None
    ) -> PredictionResult | None:
        """Segment ``volume_id`` with ``model`` (once per pair); None if already done."""
        with bind(volume_id=volume_id, model=model.model, model_version=model.version):
            stored = self._to_predict(volume_id, model, event_id)
            if stored is None:
                return None
            result = self._segment_and_store(volume_id, stored, model)
            if not self._record(result, stored.site, event_id):
                return None  # a concurrent delivery won; its mask is the same
            if self.relay is not None:
                self.relay.notify()
            PREDICTIONS.labels(model.model).inc()
            PREDICT_SECONDS.observe(result.seconds)
            log.info(
                "pre-annotated",
                extra={"uncertainty": result.uncertainty, "seconds": result.seconds},
            )
            return result

    def _to_predict(
        self, volume_id: str, model: ModelRef, event_id: str | None
    ) -> StoredVolume | None:
        """Where the volume's image is; None when this event or this (volume, model) pair has
        been handled already."""
        with session_scope(self.db) as s:
            vol = s.get(Volume, volume_id)
            if vol is None:
                raise UnknownSubject(f"unknown volume {volume_id}")
            stored = StoredVolume(vol.site_id, vol.s3_key, vol.s3_version_id)
            if event_id and event_claimed(s, CONSUMER, event_id):
                return None
            done = s.scalar(
                select(Prediction.id).where(
                    Prediction.volume_id == volume_id,
                    Prediction.model == model.model,
                    Prediction.version == model.version,
                )
            )
        if done is not None:
            if event_id:
                self._mark_done(event_id)
            return None
        return stored

    def _segment_and_store(
        self, volume_id: str, stored: StoredVolume, model: ModelRef
    ) -> PredictionResult:
        """The mask and its ``prediction.json`` written to S3 (not yet recorded)."""
        t0, started_at = time.monotonic(), time.time()
        stages = Laps()
        prepared, keeping = self._prepared(
            stored.site, volume_id, stored.key, stored.version, model, stages
        )
        seg = self.segmenter.segment(model.model, model.version, prepared)
        stages.extend(seg.timings)  # triton, resample
        mask_key = keys.prediction_mask(volume_id, model.model, model.version)
        encoded = nifti_gz_bytes(seg.label, prepared.affine)
        stages.lap("encode")
        obj = self.store.put_bytes(self.bucket, mask_key, encoded)
        stages.lap("store")
        if keeping is not None:
            keeping.result()  # kept before the prediction is recorded (never raises)
            stages.lap("keep")
        mask = BlobRef(bucket=self.bucket, key=mask_key, version_id=obj.version_id)
        result = PredictionResult(volume_id, model, mask, seg.uncertainty, time.monotonic() - t0)
        info = {
            "volume_id": volume_id,
            "model": model.model,
            "version": model.version,
            "uncertainty": result.uncertainty,
            "seconds": result.seconds,
            "mask": mask_key,
            "started_at": started_at,  # epoch seconds
            # fetch, decode, preprocess (or prepared: the kept model input), triton,
            # resample, encode, store
            "stage_seconds": stages.seconds,
        }
        self.store.put_bytes(
            self.bucket,
            keys.prediction_info(volume_id, model.model, model.version),
            json.dumps(info).encode(),
            "application/json",
        )
        return result

    def segment_session(
        self, site: str, session_id: str, image: BlobRef, model: ModelRef
    ) -> PredictionResult:
        """A MONAI Label session's image segmented by ``model``: the mask is written under
        the session's prefix; nothing is recorded or announced, nothing is kept beside it
        (the session is temporary). The result's volume id is the session's."""
        t0 = time.monotonic()
        with bind(session_id=session_id, model=model.model, model_version=model.version):
            raw = self.store.get_bytes(self.bucket, image.key, image.version_id)
            array, affine = nifti_array_from_gz(raw)
            del raw
            prepared = self.segmenter.prepare(model.model, model.version, array, affine)
            seg = self.segmenter.segment(model.model, model.version, prepared)
            key = keys.session_mask(site, session_id, model.model, model.version)
            obj = self.store.put_bytes(self.bucket, key, nifti_gz_bytes(seg.label, prepared.affine))
            mask = BlobRef(bucket=self.bucket, key=key, version_id=obj.version_id)
            result = PredictionResult(
                session_id, model, mask, seg.uncertainty, time.monotonic() - t0
            )
            log.info("session image segmented", extra={"seconds": result.seconds})
            return result

    def _record(self, result: PredictionResult, site: str, event_id: str | None) -> bool:
        """The prediction row and ``prediction.completed`` in one transaction (the volume's
        status is ingest's: it reads as predicted from this row); False if the event was
        claimed meanwhile."""
        model = result.model
        with session_scope(self.db) as s:
            if event_id and not claim_event(s, CONSUMER, event_id):
                return False
            s.add(
                Prediction(
                    volume_id=result.volume_id,
                    model=model.model,
                    version=model.version,
                    s3_key=result.mask.key,
                    uncertainty=result.uncertainty,
                    seconds=result.seconds,
                )
            )
            completed = prediction_completed(
                SOURCE,
                volume_id=result.volume_id,
                site_id=site,
                model=model,
                mask=result.mask,
                uncertainty=result.uncertainty,
                seconds=result.seconds,
            )
            stage_event(s, completed)
        return True

    def _prepared(
        self, site: str, volume_id: str, key: str, version: str | None, model: ModelRef, laps: Laps
    ) -> tuple[PreparedVolume, Future[None] | None]:
        """The volume on ``model``'s grid. Decoded and resampled once per preprocessing (model
        versions of one lineage share it): the result is kept beside the volume in S3, so a
        re-prediction after each round reads ~2 MB instead of decompressing the whole CT.
        Keeping it is written while the network runs (a full CT's input is ~30 MB: 0.12 s
        on the critical path); the future says when it is done."""
        pre = self.segmenter.preprocessor(model.model, model.version)
        kept_key = keys.volume_model_input(site, volume_id, pre.digest)
        kept = self.store.get_optional(self.bucket, kept_key)
        if kept is not None:
            try:
                prepared = PreparedVolume.from_bytes(kept)
                laps.lap("prepared")
                return prepared, None
            except ValueError:
                log.warning("kept model input unreadable; preparing again", extra={"key": kept_key})
        raw = self.store.get_bytes(self.bucket, key, version)
        laps.lap("fetch")
        image, affine = nifti_array_from_gz(raw)  # the stored type; float32 in preprocess
        del raw  # only the array goes on
        laps.lap("decode")
        prepared = self.segmenter.prepare(model.model, model.version, image, affine)
        laps.lap("preprocess")
        return prepared, self._keeping.submit(self._keep, kept_key, prepared.to_bytes())

    def _keep(self, key: str, data: bytes) -> None:
        try:
            self.store.put_bytes(self.bucket, key, data)
        except Exception:  # only a saving for later: this prediction goes on
            log.warning("could not keep the model input", exc_info=True, extra={"key": key})

    def _mark_done(self, event_id: str) -> None:
        with session_scope(self.db) as s:
            claim_event(s, CONSUMER, event_id)

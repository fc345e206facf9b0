"""4. Round turnaround: from a round's last annotation to the new sustainer serving and the
first re-prediction done, against the same work in one script (fine-tune the same parent on
the same volumes for the same steps, load the result, segment the waiting volume).

The platform's turnaround is split into: policy wait (debounce and tick until the training
service opens the round), the round (materialise from S3, torchrun start, the training loop,
held-out validation, publish), load (outbox → Kafka → inference service → Triton load) and the
re-prediction of the volume waiting for annotation. It runs on a platform of its own, so the
re-prediction after each round touches only its volumes.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from bench.b1_preannotation import upload
from bench.common import Context, interleaved, median, result
from bench.platform import CompletionWatcher, Platform, bench_platform
from bench.session import SITE, Session
from bench.workload import CT, phantom_ct
from ctloop.contracts.payloads import ModelRef
from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.datasets import Volume, write_decathlon
from ctloop.core.infer import Segmenter
from ctloop.core.train import DataSource, TrainConfig, train
from ctloop.db import RoundStatus, ServingModel, TrainingRound, session_scope

NAME = "4_round"
PER_ROUND = 2  # corrected volumes that start a round


def _epoch(dt: datetime | None) -> float:
    assert dt is not None
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _annotate(client: Any, vid: str, ct: CT, igniter: ModelRef) -> None:
    r = client.post(
        f"/v1/volumes/{vid}/annotations",
        files={"mask": ("m.nii.gz", nifti_gz_bytes(ct.label, ct.affine), "application/gzip")},
        data={"minutes": "5", "from_model": f"{igniter.model}:{igniter.version}"},
    )
    if r.status_code != 201:
        raise RuntimeError(f"annotation of {vid} refused: {r.status_code} {r.text}")


def _round_row(p: Platform, version: int) -> TrainingRound | None:
    with session_scope(p.settings.database_url) as s:
        for row in s.query(TrainingRound).filter(TrainingRound.model == p.sustainer):
            if row.version == version and row.finished_at is not None:
                s.expunge(row)
                return row
    return None


def _serving(p: Platform, version: int) -> bool:
    """Whether sustainer ``version`` serves; a failed round ends the benchmark."""
    with session_scope(p.settings.database_url) as s:
        row = s.get(ServingModel, p.sustainer)
        failed = s.scalars(
            select(TrainingRound.reason).where(
                TrainingRound.model == p.sustainer, TrainingRound.status == RoundStatus.FAILED
            )
        ).first()
        if failed is not None:
            raise RuntimeError(f"a sustainer round failed: {failed[-1500:]}")
        return row is not None and row.version == version


def run(ctx: Context, session: Session) -> dict[str, Any]:
    preset = ctx.preset
    reps = preset.round_repeats
    env = {
        "CTLOOP_TRAINING__ROUND_MIN_NEW": str(PER_ROUND),
        "CTLOOP_TRAINING__DEBOUNCE_S": "1",
        "CTLOOP_TRAINING__TICK_S": "0.5",
        "CTLOOP_TRAINING__HOLDOUT_EVERY": "3",
        "CTLOOP_TRAINING__NPROC_PER_NODE": "1",
        "CTLOOP_TRAINING__PUBLIC_REPLAY": "0",
        "CTLOOP_TRAINING__SUSTAINER_STEPS": str(preset.round_steps),
        "CTLOOP_TRAINING__ACCEPT_TOLERANCE": "1.0",
        # The sustainer fine-tunes the igniter's architecture; the round's crops use this one.
        "CTLOOP_TRAINING__MODEL": json.dumps(preset.model),
    }
    ckpt = session.checkpoint
    cts = {i: phantom_ct(preset.round_size, seed=400 + i) for i in range(1 + PER_ROUND * reps)}
    with bench_platform(ctx.work / "round-platform", ctx.port_base + 8, env) as p:
        with p.client() as c:
            c.post("/v1/sites", json={"id": SITE}).raise_for_status()
        igniter = p.publish(ckpt, p.igniter, 1)
        p.until("the igniter serving", lambda: _serving_igniter(p), 300)
        ids = {i: f"b4-{p.tag}-{i}" for i in cts}
        waiting = ids[0]
        parts: list[dict[str, float]] = []
        with CompletionWatcher(p) as watch, p.client() as client:
            for i, vid in ids.items():
                upload(p, cts[i], vid)
            for vid in ids.values():
                watch.wait(vid, igniter)

            def platform_side(r: int) -> float:
                version = r + 1
                for i in range(1 + PER_ROUND * r, 1 + PER_ROUND * (r + 1)):
                    _annotate(client, ids[i], cts[i], igniter)
                t0 = time.time()
                serving_at = p.until(
                    "the sustainer serving", lambda: _serving(p, version) and time.time(), 1800
                )
                done = watch.wait(waiting, ModelRef(model=p.sustainer, version=version))
                row = _round_row(p, version)
                assert row is not None
                rank0 = p.run_dir / "data" / "training" / f"round-{row.id:04d}"
                loop_s = json.loads((rank0 / "candidate.ranks" / "rank-0.json").read_text())[
                    "seconds"
                ]
                started, finished = _epoch(row.started_at), _epoch(row.finished_at)
                parts.append(
                    {
                        "policy_wait": started - t0,
                        "training_loop": loop_s,
                        "round_other": finished - started - loop_s,
                        "load": serving_at - finished,
                        "repredict": done - serving_at,
                        "train_volumes": len(row.volumes.get("train", [])),
                        "holdout_volumes": len(row.volumes.get("holdout", [])),
                    }
                )
                return done - t0

            def baseline(r: int) -> float:
                # The same fine-tune as round r: the same parent, volumes and steps.
                train_ids = [
                    ids[i] for i in range(1, 1 + PER_ROUND * (r + 1))
                ]  # every corrected volume so far (the platform holds some out)
                folder = ctx.work / "b4-baseline" / f"r{r}"
                vols = [
                    Volume(id=v, image=cts[i].image, affine=cts[i].affine, label=cts[i].label)
                    for i, v in ids.items()
                    if v in train_ids
                ]
                t0 = time.perf_counter()
                write_decathlon(folder / "data", vols, name="b4")
                cfg = TrainConfig(
                    model=preset.model_config(),
                    sources=[DataSource(path=folder / "data")],
                    out=folder / "model.pt",
                    init_from=_parent(ctx, ckpt, folder, r),
                    steps=preset.round_steps,
                    lr=1e-3,
                    seed=r,
                )
                train(cfg)
                Segmenter(cfg.out)(cts[0].image, cts[0].affine)
                return time.perf_counter() - t0

            ours, theirs = interleaved(reps, platform_side, baseline)
    keys = [k for k in parts[0] if not k.endswith("volumes")]
    breakdown = {k: median([x[k] for x in parts]) for k in keys}
    return result(
        NAME,
        "Round turnaround",
        "last annotation → sustainer serving + first re-prediction",
        "s",
        ours,
        theirs,
        {
            "volumes_per_round": PER_ROUND,
            "phantom_size": preset.round_size,
            "steps": preset.round_steps,
            "torchrun_processes": 1,
            "debounce_s": 1,
            "tick_s": 0.5,
            "holdout_every": 3,
            "repeats": reps,
        },
        baseline_name="in-process fine-tune + predict",
        details={
            "breakdown_median_s": breakdown,
            "rounds": parts,
            "note": "platform split: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in breakdown.items())
            + " (the script trains on every corrected volume, the platform holds every 3rd out "
            "and validates on it)",
        },
    )


def _serving_igniter(p: Platform) -> bool:
    with session_scope(p.settings.database_url) as s:
        row = s.get(ServingModel, p.igniter)
        return row is not None


def _parent(ctx: Context, igniter_ckpt: Path, folder: Path, r: int) -> Path:
    """Round r fine-tunes the previous round's result (round 0: the igniter), as the platform."""
    if r == 0:
        return igniter_ckpt
    previous = folder.parent / f"r{r - 1}" / "model.pt"
    return previous if previous.exists() else igniter_ckpt

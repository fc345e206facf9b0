"""1. Pre-annotation overhead: one CT from upload to ``prediction.completed`` (and through the
inference service's gRPC ``Segment``, which here re-predicts a volume whose model input is
kept) against in-process MONAI sliding-window inference of the
same weights on the same volume (:class:`ctloop.core.infer.Segmenter`, the code Triton runs).

The platform time is broken down from what the services record: the upload (client → ingest,
validated and stored), queueing (outbox → Kafka → the inference consumer), the worker's stages
(S3 fetch, NIfTI decode, Triton, mask encode, S3 write; ``stage_seconds`` in the prediction's
info JSON) and the tail (prediction info write, DB commit, outbox → Kafka → the watcher).
The inference service resamples to the model grid itself (``preprocess``, the same code as
in-process; ``keep``: writing the model-grid input beside the volume for later re-predictions);
Triton runs the network and the resampling back (``network``, ``resample``: model interface 3,
the same code again, on the GPU in a GPU deployment) and ``transfer`` is the rest of the call
(the model-grid input there, the labels back, python-backend overhead). ``triton_overhead``:
Triton's network and transfer against the in-process network on the same volume.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from bench.common import (
    STUB,
    Context,
    find_pids,
    interleaved,
    median,
    medians,
    reset_peak_rss,
    result,
    rss_mb,
    stubs_started_since,
)
from bench.platform import CompletionWatcher, Platform
from bench.session import SITE, Session
from bench.workload import CT, phantom_ct
from ctloop.contracts import keys
from ctloop.contracts.payloads import ModelRef
from ctloop.core.infer import Segmenter
from ctloop.core.model import load_checkpoint
from ctloop.core.packaging import package_checkpoint, segmentation_spec
from ctloop.core.runtimes import export_onnx, onnx_predictor
from ctloop.model_repository import ModelRepository
from ctloop.triton_serving import TritonModels, TritonSegmenter
from ctloop.v1 import common_pb2, inference_pb2, inference_pb2_grpc

log = logging.getLogger("ctloop.bench")
NAME = "1_preannotation"


def upload(p: Platform, ct: CT, volume_id: str, dataset: str = "clinical") -> float:
    """Upload the CT (clinical: ``PUT`` of the file itself, as a clinical tool would; labelled:
    the multipart ``POST``); the seconds until ingest answered."""
    t0 = time.perf_counter()
    if dataset == "clinical":
        status, body = p.put_volume(volume_id, ct.nifti_gz, SITE)
    else:
        status, _, body = p.upload(
            {"file": ("ct.nii.gz", ct.nifti_gz, "application/gzip")},
            {"site_id": SITE, "dataset": dataset, "volume_id": volume_id},
        )
    if status != 201:
        raise RuntimeError(f"upload of {volume_id} refused: {status} {body}")
    return time.perf_counter() - t0


def prediction_info(p: Platform, volume_id: str, model: str, version: int) -> dict[str, Any]:
    from ctloop.storage import ObjectStore

    key = keys.prediction_info(volume_id, model, version)
    return dict(json.loads(ObjectStore(p.settings).get_bytes(p.settings.s3.bucket, key)))


def run(ctx: Context, session: Session, repeats: int | None = None) -> dict[str, Any]:
    """Benchmark 1; ``details.memory`` feeds benchmark 7."""
    repeats = repeats or ctx.preset.repeats
    p, served = session.served()
    ct = phantom_ct(ctx.preset.volume_size, seed=1)
    segmenter = Segmenter(session.checkpoint)
    served_runtime = _served_runtime(p, session)
    direct, stubs = _serve_direct(p, session)
    channel = p.grpc_channel(  # as the operator: the services refuse calls without a token
        p.inference_grpc,
        options=[("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)],
    )
    pids = p.service_pids()
    with CompletionWatcher(p) as watch:
        inference = inference_pb2_grpc.InferenceStub(channel)
        sides = _Sides(p, served, watch, inference, direct, ct, segmenter, served_runtime, ctx.work)
        # Warm-up, not measured: Triton's first request and torch's first kernels are slower.
        sides.platform_side(-1)
        sides.baseline(-1)
        sides.clear()
        # Memory is measured from here: the warm size, and the peak over the measured repeats
        # (what one more volume costs, not the first request's one-off allocations).
        idle_rss = {n: rss_mb(pid, "VmRSS") for n, pid in pids.items()}
        for pid in [*pids.values(), *session.igniter_stubs, *stubs]:
            reset_peak_rss(pid)
        ours, theirs = interleaved(repeats, sides.platform_side, sides.baseline)
    channel.close()
    memory = _memory(ct, idle_rss, pids, session.igniter_stubs, stubs)
    return _result(ctx, sides, repeats, ours, theirs, memory)


def _served_runtime(p: Platform, session: Session) -> Segmenter:
    """The same weights in-process under the runtime Triton's CPU instance runs them with
    (ONNX Runtime over the same export as at publish, or torch), for a script that differs from
    the platform only by being a script."""
    segmenter = Segmenter(session.checkpoint)
    if p.settings.triton.cpu_runtime == "onnxruntime":
        cfg, net, _ = load_checkpoint(session.checkpoint)
        onnx = export_onnx(net, cfg)
        segmenter.network.predictor = onnx_predictor(onnx, threads=torch.get_num_threads())
    return segmenter


def _serve_direct(p: Platform, session: Session) -> tuple[str, list[int]]:
    """The same weights under a second name, loaded straight into Triton, for gRPC Segment on
    volumes the event path has already pre-annotated (one prediction per volume and model).
    Their model input is kept by then, so this times the re-prediction path (what every
    waiting volume costs after a round): no fetch, decode or preprocess of the CT. Returns the
    model's name and its Triton stub processes."""
    direct = f"direct{p.tag}"
    stubs_before = set(find_pids(STUB))
    spec = segmentation_spec(direct)
    package = package_checkpoint(session.checkpoint, spec)
    ModelRepository(p.settings).publish_version(spec, 1, package.files, package.manifest)
    triton = TritonModels(p.settings)
    TritonSegmenter(triton, ModelRepository(p.settings)).serve_version(direct, 1)
    session.stack.callback(triton.client.unload_model, direct)
    return direct, stubs_started_since(stubs_before, p.settings.triton.pipeline_model)


@dataclass
class _Sides:
    """Both sides of benchmark 1, and what each repeat records beside its time: the platform's
    stage breakdown and gRPC Segment time, the in-process stages and the script's time."""

    p: Platform
    served: ModelRef
    watch: CompletionWatcher
    inference: inference_pb2_grpc.InferenceStub
    direct: str
    ct: CT
    segmenter: Segmenter
    runtime_segmenter: Segmenter  # the same weights under the runtime Triton runs (ONNX Runtime)
    work: Path
    breakdowns: list[dict[str, float]] = field(default_factory=list)
    grpc_seconds: list[float] = field(default_factory=list)
    local_stages: list[dict[str, float]] = field(default_factory=list)
    script_seconds: list[float] = field(default_factory=list)
    runtime_script_seconds: list[float] = field(default_factory=list)
    runtime_stages: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        """The CT as a file, for the script."""
        self.ct_file = self.work / "b1-ct.nii.gz"
        self.ct_file.write_bytes(self.ct.nifti_gz)

    def clear(self) -> None:
        """Forget the warm-up's records."""
        self.breakdowns.clear()
        self.grpc_seconds.clear()
        self.local_stages.clear()
        self.script_seconds.clear()
        self.runtime_script_seconds.clear()
        self.runtime_stages.clear()

    def platform_side(self, i: int) -> float:
        p, vid = self.p, f"b1-{self.p.tag}-{i}"
        t0 = time.time()
        upload_s = upload(p, self.ct, vid)
        done = self.watch.wait(vid, self.served)
        info = prediction_info(p, vid, self.served.model, self.served.version)
        stages = info.get("stage_seconds", {})
        self.breakdowns.append(
            {
                "upload": upload_s,
                "queue": info["started_at"] - (t0 + upload_s),
                **stages,
                "completion": done - info["started_at"] - sum(stages.values()),
            }
        )
        g0 = time.perf_counter()
        self.inference.Segment(
            inference_pb2.SegmentRequest(
                volume=common_pb2.VolumeRef(volume_id=vid, site_id=SITE),
                model=common_pb2.ModelVersionRef(model=self.direct, version=1),
            )
        )
        self.grpc_seconds.append(time.perf_counter() - g0)
        return done - t0

    def script(self, segmenter: Segmenter) -> tuple[float, dict[str, float]]:
        """What a user's script does with the same file: nibabel load, segment, save the
        mask as NIfTI (the platform's job is file in, mask file out, too); its seconds and
        the segmenter's stages."""
        t0 = time.perf_counter()
        img = nib.Nifti1Image.from_filename(self.ct_file)
        seg = segmenter(np.asanyarray(img.dataobj), img.affine)
        nib.save(nib.Nifti1Image(seg.label, img.affine), self.work / "b1-mask.nii.gz")
        return time.perf_counter() - t0, seg.timings

    def baseline(self, i: int) -> float:
        t0 = time.perf_counter()
        seg = self.segmenter(self.ct.image, self.ct.affine)
        seconds = time.perf_counter() - t0
        self.local_stages.append(seg.timings)
        # In the baseline's slot, so the scripts meet the same conditions (ABAB order): torch,
        # as a user's script runs the network, and the runtime Triton runs it with.
        self.script_seconds.append(self.script(self.segmenter)[0])
        runtime_s, runtime_stages = self.script(self.runtime_segmenter)
        self.runtime_script_seconds.append(runtime_s)
        self.runtime_stages.append(runtime_stages)
        return seconds


def _memory(
    ct: CT, idle_rss: dict[str, float], pids: dict[str, int], igniter: list[int], direct: list[int]
) -> dict[str, Any]:
    """Sizes and peaks for benchmark 7: the services' warm and peak RSS, the Triton stubs'."""
    return {
        "volume_mb": ct.megabytes,
        "upload_mb": len(ct.nifti_gz) / 1e6,
        "services_idle_rss_mb": idle_rss,
        "services_peak_rss_mb": {n: rss_mb(pid) for n, pid in pids.items()},
        "triton_stub_peak_rss_mb": {
            "event path (igniter)": [rss_mb(s) for s in igniter],
            "gRPC Segment (direct)": [rss_mb(s) for s in direct],
        },
    }


def _stages(sides: _Sides) -> tuple[dict[str, float], dict[str, float]]:
    """The median platform breakdown (its Triton stage split into the in-process network time
    and the rest) and the median in-process stages."""
    breakdown = medians(sides.breakdowns)
    local = medians(sides.local_stages)
    # The network in-process under the runtime Triton runs (what its network stage compares to)
    same = medians(sides.runtime_stages)["network"]
    breakdown["triton_network_in_process_equivalent"] = same
    # What serving adds to the in-process network: interface 3 reports Triton's network and
    # the transfer apart; an interface-2 model's "triton" stage is both together.
    served = breakdown.get("triton", 0.0) + breakdown.get("network", 0.0)
    breakdown["triton_overhead"] = served + breakdown.get("transfer", 0.0) - same
    return breakdown, local


def _note(
    ratios: dict[str, float],
    scripts: tuple[float, float],
    breakdown: dict[str, float],
    local: dict[str, float],
) -> str:
    return (
        f"upload→prediction.completed {ratios['event']:.2f}x and gRPC Segment "
        f"{ratios['grpc']:.2f}x (re-prediction: the volume's model input kept) "
        "the in-process Segmenter (torch); "
        f"{ratios['script']:.2f}x a script that loads the file, "
        f"segments with torch and saves the mask ({scripts[0]:.2f}s), "
        f"{ratios['script_same_runtime']:.2f}x the same script with the runtime Triton runs "
        f"({scripts[1]:.2f}s); platform stages "
        + ", ".join(
            f"{k} {v:.2f}s"
            for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1])
            if k not in ("triton", "triton_network_in_process_equivalent") and v > 0.05
        )
        + "; in-process: "
        + ", ".join(f"{k} {v:.2f}s" for k, v in local.items())
        + "."
    )


def _settings(
    ctx: Context, p: Platform, ct: CT, segmenter: Segmenter, repeats: int
) -> dict[str, Any]:
    return {
        "volume_shape": list(ct.image.shape),
        "volume_dtype": "float32",
        "volume_mb": round(ct.megabytes, 1),
        "phantom_size": ctx.preset.volume_size,
        "model": segmenter.cfg.model_dump(mode="json"),
        "sw_batch_size": segmenter.sw_batch_size,
        "sw_overlap": segmenter.sw_overlap,
        "repeats": repeats,
        "torch_threads_in_process": ctx.threads,
        "triton": "python backend, KIND_CPU, 1 instance, max_batch_size 0 (no batching), "
        f"network under {p.settings.triton.cpu_runtime}",
    }


def _result(
    ctx: Context,
    sides: _Sides,
    repeats: int,
    ours: list[float],
    theirs: list[float],
    memory: dict[str, Any],
) -> dict[str, Any]:
    breakdown, local = _stages(sides)
    grpc_s, script_s = sides.grpc_seconds, sides.script_seconds
    runtime_s = sides.runtime_script_seconds
    ratios = {
        "event": median(ours) / median(theirs),
        "grpc": median(grpc_s) / median(theirs),
        "script": median(ours) / median(script_s),
        "script_same_runtime": median(ours) / median(runtime_s),
    }
    return result(
        NAME,
        "Pre-annotation overhead",
        "upload → prediction.completed",
        "s",
        ours,
        theirs,
        _settings(ctx, sides.p, sides.ct, sides.segmenter, repeats),
        baseline_name="in-process Segmenter",
        target="≤ 1.10",
        target_met=ratios["event"] <= 1.10,
        details={
            "grpc_segment_seconds": grpc_s,
            "grpc_segment_median": median(grpc_s),
            "grpc_segment_ratio": ratios["grpc"],
            "script_seconds": script_s,
            "script_median": median(script_s),
            "ratio_vs_script": ratios["script"],
            "script_same_runtime_seconds": runtime_s,
            "script_same_runtime_median": median(runtime_s),
            "ratio_vs_script_same_runtime": ratios["script_same_runtime"],
            "in_process_same_runtime_stages_median_s": medians(sides.runtime_stages),
            "breakdown_median_s": breakdown,
            "breakdowns_s": sides.breakdowns,
            "in_process_stages_median_s": local,
            "memory": memory,
            "note": _note(ratios, (median(script_s), median(runtime_s)), breakdown, local),
        },
    )

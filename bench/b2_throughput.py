"""2. Throughput: N CTs submitted at once (concurrent uploads), volumes per minute until the
last ``prediction.completed``, against an in-process loop of the Segmenter over the same N.

Triton serves the model with the python backend, one CPU instance (``KIND_CPU``, count 1) and
no batching (``max_batch_size: 0``, no dynamic batcher): a CT is one request and the inference
service sends one at a time, so the platform pipelines uploads, transfer and S3 writes with
inference but runs one inference at a time, like the loop.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.b1_preannotation import upload
from bench.common import Context, interleaved, result
from bench.platform import CompletionWatcher
from bench.session import Session
from bench.workload import phantom_ct
from ctloop.core.infer import Segmenter

NAME = "2_throughput"


def run(ctx: Context, session: Session) -> dict[str, Any]:
    preset = ctx.preset
    n = preset.throughput_volumes
    repeats = max(1, preset.repeats - 1)
    p, served = session.served()
    cts = [phantom_ct(preset.throughput_size, seed=10 + i) for i in range(n)]
    segmenter = Segmenter(session.checkpoint)
    segmenter(cts[0].image, cts[0].affine)  # warm-up

    with CompletionWatcher(p) as watch:

        def platform_side(r: int) -> float:
            ids = [f"b2-{p.tag}-{r}-{i}" for i in range(n)]
            t0 = time.time()
            with ThreadPoolExecutor(max_workers=n) as pool:
                list(pool.map(lambda a: upload(p, *a), zip(cts, ids, strict=True)))
            last = max(watch.wait(v, served) for v in ids)
            return n / (last - t0) * 60.0

        def baseline(r: int) -> float:
            t0 = time.perf_counter()
            for ct in cts:
                segmenter(ct.image, ct.affine)
            return n / (time.perf_counter() - t0) * 60.0

        ours, theirs = interleaved(repeats, platform_side, baseline)
    return result(
        NAME,
        "Throughput",
        f"{n} CTs submitted at once",
        "volumes/min",
        ours,
        theirs,
        {
            "volumes": n,
            "volume_shape": list(cts[0].image.shape),
            "phantom_size": preset.throughput_size,
            "repeats": repeats,
            "upload_concurrency": n,
            "triton_instances": "1 x KIND_CPU",
            "triton_batching": "none (max_batch_size 0, no dynamic batcher)",
            "inference_consumers": "1 (one request to Triton at a time)",
            "torch_threads_in_process": ctx.threads,
        },
        baseline_name="in-process Segmenter loop",
        higher_is_better=True,
    )

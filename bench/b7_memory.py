"""7. Memory: peak RSS of each service and of the Triton python-backend processes while
benchmark 1 runs, against the peak RSS of in-process inference on the same volume (a fresh
process that loads the same checkpoint and segments the volume once).

Peaks are the kernel's high-water marks (``VmHWM``), so no short spike is missed; both sides
restart them after a warm-up prediction, so a peak is what one more volume costs. The target:
the inference path (inference service, Triton stub) grows by at most a small multiple (4x) of
the float32 volume over its idle size.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np

from bench import b1_preannotation
from bench.common import Context, result
from bench.session import Session
from bench.workload import phantom_ct

NAME = "7_memory"
MAX_MULTIPLE = 4.0

_IN_PROCESS = """
import json, sys
from pathlib import Path
import numpy as np
from ctloop.core.infer import Segmenter

def status_kib(field):
    line = [x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field)]
    return int(line[0].split()[1])

seg = Segmenter(sys.argv[1])
data = np.load(sys.argv[2])
seg(data["image"], data["affine"])  # warm-up, as on the platform side
idle = status_kib("VmRSS:")
Path("/proc/self/clear_refs").write_text("5")
seg(data["image"], data["affine"])
peak = status_kib("VmHWM:")
print(json.dumps({"idle_mb": idle / 1024, "peak_mb": peak / 1024}))
"""


def in_process_peak(ctx: Context, session: Session) -> dict[str, float]:
    ct = phantom_ct(ctx.preset.volume_size, seed=1)
    path = ctx.work / "b7-volume.npz"
    np.savez(path, image=ct.image, affine=ct.affine)
    out = subprocess.run(
        [sys.executable, "-c", _IN_PROCESS, str(session.checkpoint), str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    path.unlink()
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run(ctx: Context, session: Session, b1: dict[str, Any] | None = None) -> dict[str, Any]:
    """From benchmark 1's run when given, else from a one-repeat run of it."""
    b1 = b1 or b1_preannotation.run(ctx, session, repeats=1)
    mem = b1["details"]["memory"]
    base = in_process_peak(ctx, session)
    volume = mem["volume_mb"]
    growth = {
        n: mem["services_peak_rss_mb"][n] - mem["services_idle_rss_mb"][n]
        for n in mem["services_peak_rss_mb"]
    }
    stub_peaks = [v for peaks in mem["triton_stub_peak_rss_mb"].values() for v in peaks]
    # The inference path: the service's own growth, and the Triton stub's whole peak (it holds
    # the network and the volume; its idle size is the interpreter with torch and MONAI).
    path_peak = growth.get("inference", 0.0) + max(stub_peaks, default=0.0)
    base_growth = base["peak_mb"] - base["idle_mb"]
    worst = max(growth.get("inference", 0.0), base_growth) / volume
    return result(
        NAME,
        "Memory",
        "peak RSS of the inference path (service growth + Triton stub peak)",
        "MB",
        [path_peak],
        [base["peak_mb"]],
        {
            "volume_mb": volume,
            "volume_shape": b1["settings"]["volume_shape"],
            "measured": "VmHWM (kernel peak RSS) over benchmark 1's measured repeats, after a "
            "warm-up; in-process: the same over a second segmentation",
        },
        baseline_name="in-process Segmenter process peak",
        target=f"inference service grows ≤ {MAX_MULTIPLE:g}x the volume",
        target_met=growth.get("inference", 0.0) <= MAX_MULTIPLE * volume,
        details={
            "services_peak_rss_mb": mem["services_peak_rss_mb"],
            "services_growth_mb": growth,
            "services_growth_x_volume": {n: g / volume for n, g in growth.items()},
            "triton_stub_peak_rss_mb": mem["triton_stub_peak_rss_mb"],
            "in_process_mb": base,
            "in_process_growth_x_volume": base_growth / volume,
            "note": (
                f"volume {volume:.0f} MB; inference service grew "
                f"{growth.get('inference', 0.0) / volume:.1f}x, ingest "
                f"{growth.get('ingest', 0.0) / volume:.1f}x, in-process inference "
                f"{base_growth / volume:.1f}x the volume (worst {worst:.1f}x)"
            ),
        },
    )

"""What every benchmark shares: presets, timing statistics, memory probes and the results file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ctloop.core.model import TINY_MODEL, ModelConfig
from ctloop.transfer.presets import PRESETS as RUN_PRESETS

log = logging.getLogger("ctloop.bench")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MAX_SAMPLES = 50  # per side kept in latest.json


@dataclass(frozen=True)
class Preset:
    """How big each benchmark runs. ``smoke`` only proves that everything runs."""

    name: str
    volume_size: str  # phantom size of the pre-annotation and ingest volumes
    model: dict[str, Any]  # ModelConfig overrides of the served model
    train_steps: int  # steps of the checkpoint both sides serve
    repeats: int  # measurements per side (ABAB-interleaved)
    throughput_volumes: int
    throughput_size: str
    training_steps: int  # per run of the scaling benchmark
    training_size: str
    round_repeats: int
    round_size: str
    round_steps: int
    ingest_repeats: int
    bus_events: int

    def model_config(self) -> ModelConfig:
        return ModelConfig.model_validate(self.model)


SMALL_MODEL = {"channels": [8, 16, 32], "strides": [2, 2]}

PRESETS: dict[str, Preset] = {
    "smoke": Preset("smoke", "tiny", TINY_MODEL, 2, 1, 2, "tiny", 4, "tiny", 1, "tiny", 2, 2, 40),
    "quick": Preset(
        "quick", "medium", SMALL_MODEL, 12, 3, 4, "small", 20, "small", 2, "small", 10, 5, 300
    ),
    "full": Preset("full", "full", {}, 60, 5, 8, "full", 80, "small", 3, "small", 60, 5, 2000),
    # The network a clinic would run (the `full` run preset's: 1.5 x 1.5 x 2 mm, channels
    # 32-256, patch 128 x 128 x 96), trained briefly (speed, not accuracy), on 512 x 512 CTs;
    # meant for `--only preannotation` (issue 21).
    "realistic": Preset(
        "realistic",
        "full",
        RUN_PRESETS["full"].model,
        12,
        3,
        2,
        "full",
        20,
        "small",
        2,
        "small",
        20,
        5,
        300,
    ),
}


@dataclass
class Context:
    """One run of the benchmarks: its preset, scratch folder, ports and device."""

    preset: Preset
    work: Path
    port_base: int = 29000  # HTTP port p, gRPC p+1 for each service: 8 ports per platform
    device: str = "cpu"
    threads: int = field(default_factory=torch.get_num_threads)


# ---------------------------------------------------------------- statistics
def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0..100), nearest-rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100.0 * len(ordered) + 0.5)))
    return float(ordered[rank - 1])


def medians(rows: list[dict[str, float]], keys: list[str] | None = None) -> dict[str, float]:
    """The median of each key over per-repeat breakdowns (the first row's keys unless given;
    a row without a key counts 0 for it)."""
    return {k: median([row.get(k, 0.0) for row in rows]) for k in (keys or list(rows[0]))}


def interleaved(
    repeats: int, platform_side: Callable[[int], float], baseline: Callable[[int], float]
) -> tuple[list[float], list[float]]:
    """``repeats`` measurements of each side, ABAB: load that comes and goes hits both."""
    ours, theirs = rotated(repeats, platform_side, baseline)
    return ours, theirs


def rotated(repeats: int, *sides: Callable[[int], float]) -> list[list[float]]:
    """``repeats`` measurements of each side, the order turned by one each repeat (ABC BCA
    CAB ...): load that comes and goes hits every side alike. The first side is ctloop's."""
    samples: list[list[float]] = [[] for _ in sides]
    for i in range(repeats):
        for k in range(len(sides)):
            at = (i + k) % len(sides)
            samples[at].append(sides[at](i))
        log.info(
            "repeat done",
            extra={
                "repeat": i,
                "ctloop": samples[0][-1],
                "baselines": [x[-1] for x in samples[1:]],
            },
        )
    return samples


class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    def __enter__(self) -> Stopwatch:
        self.t0 = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0


# ---------------------------------------------------------------- memory
def proc_status_kib(pid: int, field_name: str) -> int | None:
    """A ``/proc/<pid>/status`` memory field (``VmRSS``, ``VmHWM`` = peak RSS) in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def rss_mb(pid: int, field_name: str = "VmHWM") -> float:
    """A process's ``VmRSS`` or peak (``VmHWM``) in MB; 0 when it cannot be read."""
    return (proc_status_kib(pid, field_name) or 0) / 1024


def reset_peak_rss(pid: int) -> None:
    """Restart ``VmHWM`` from the current RSS (Linux ``clear_refs`` 5), so a peak read later
    covers only what ran after this call (warm-up allocations are not counted)."""
    # Not ours, or gone: the peak then covers the process's whole life.
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def find_pids(cmdline_part: str) -> list[int]:
    """Processes whose command line contains ``cmdline_part`` (read-only look-up)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if cmdline_part in cmd:
            found.append(int(entry.name))
    return found


# Triton's python-backend processes: one per loaded model instance.
STUB = "triton_python_backend_stub"


def triton_stubs_of(model: str) -> list[int]:
    """Triton python-backend stub processes serving ``model``: a stub's command line names
    its version's file (``<copy>/<version>/model.py``) in Triton's local copy of the model,
    whose ``config.pbtxt`` names the model."""
    found = []
    for pid in find_pids(STUB):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            config = (Path(args[1].decode()).parent.parent / "config.pbtxt").read_text()
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        if f'name: "{model}"' in config:
            found.append(pid)
    return found


def stubs_started_since(before: set[int], pipeline_model: str) -> list[int]:
    """The Triton stubs started since ``before`` was taken (a version's own), and on CPU the
    long-lived pipeline model's, which runs the sliding window and the finish for every
    version (loaded before, maybe)."""
    return sorted((set(find_pids(STUB)) - before) | set(triton_stubs_of(pipeline_model)))


# ---------------------------------------------------------------- results
def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = proc_meminfo_kib("MemTotal")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
        "gpu": gpu,
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": list(os.getloadavg()),
        "commit": _git_commit(),
    }


def proc_meminfo_kib(name: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def result(
    name: str,
    title: str,
    metric: str,
    unit: str,
    ctloop: list[float],
    baseline: list[float],
    settings: dict[str, Any],
    *,
    baseline_name: str,
    higher_is_better: bool = False,
    target: str | None = None,
    target_met: bool | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One benchmark's entry in latest.json: samples, medians, ratio ctloop / baseline."""
    ours, theirs = median(ctloop), median(baseline)
    ratio = ours / theirs if theirs else float("nan")
    return {
        "name": name,
        "title": title,
        "metric": metric,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "baseline": baseline_name,
        "ctloop_median": ours,
        "baseline_median": theirs,
        "ratio": ratio,
        "target": target,
        "target_met": target_met,
        # (long series, e.g. per-event latencies, are summarised by the details instead)
        "ctloop_samples": ctloop if len(ctloop) <= MAX_SAMPLES else None,
        "baseline_samples": baseline if len(baseline) <= MAX_SAMPLES else None,
        "samples": [len(ctloop), len(baseline)],
        "settings": settings,
        "details": details or {},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def write_results(
    results: list[dict[str, Any]], out_dir: Path, preset: str, machine_info: dict[str, Any]
) -> tuple[Path, Path]:
    """Merge ``results`` into ``latest.json`` (by name) and rewrite ``latest.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "latest.json"
    doc: dict[str, Any] = {"benchmarks": {}}
    if path.exists():
        with contextlib.suppress(json.JSONDecodeError):
            doc = json.loads(path.read_text())
    if doc.get("preset") not in (None, preset):
        doc = {"benchmarks": {}}  # another preset's numbers are not comparable
    doc["preset"], doc["machine"] = preset, machine_info
    doc["updated_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    doc.setdefault("benchmarks", {}).update({r["name"]: r for r in results})
    doc["benchmarks"] = dict(sorted(doc["benchmarks"].items()))
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    md = out_dir / "latest.md"
    md.write_text(markdown_table(doc))
    return path, md


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def markdown_table(doc: dict[str, Any]) -> str:
    m = doc.get("machine", {})
    lines = [
        f"Preset `{doc.get('preset')}`, {doc.get('updated_at')}, commit {m.get('commit')}: "
        f"{m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU")
        + f", torch {m.get('torch')} ({m.get('torch_threads')} threads).",
        "",
        "| # | benchmark | metric | ctloop | baseline | ratio | target |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in doc.get("benchmarks", {}).values():
        target = r.get("target") or ""
        if r.get("target_met") is not None:
            target += " ✔" if r["target_met"] else " ✘ missed"
        lines.append(
            f"| {r['name'].split('_')[0]} | {r['title']} | {r['metric']} ({r['unit']}) | "
            f"{_fmt(r['ctloop_median'])} | {_fmt(r['baseline_median'])} ({r['baseline']}) | "
            f"{_fmt(r['ratio'])} | {target.strip()} |"
        )
    notes = [
        f"- **{r['title']}**: {r['details']['note']}"
        for r in doc.get("benchmarks", {}).values()
        if r.get("details", {}).get("note")
    ]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"

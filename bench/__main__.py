"""``python -m bench [--preset quick|full|smoke] [--only NAME ...]``: run the benchmarks, print
progress, write ``bench/results/latest.json`` and ``latest.md``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    b1_preannotation,
    b2_throughput,
    b3_training,
    b4_round,
    b5_ingest,
    b6_bus,
    b7_memory,
)
from bench.common import PRESETS, RESULTS_DIR, Context, machine, write_results
from bench.session import Session
from ctloop.log import configure_logging

log = logging.getLogger("ctloop.bench")

Runner = Callable[[Context, Session, dict[str, dict[str, Any]]], dict[str, Any]]
BENCHMARKS: dict[str, Runner] = {
    "preannotation": lambda ctx, s, done: b1_preannotation.run(ctx, s),
    "throughput": lambda ctx, s, done: b2_throughput.run(ctx, s),
    "training": lambda ctx, s, done: b3_training.run(ctx),
    "round": lambda ctx, s, done: b4_round.run(ctx, s),
    "ingest": lambda ctx, s, done: b5_ingest.run(ctx, s),
    "bus": lambda ctx, s, done: b6_bus.run(ctx, s),
    "memory": lambda ctx, s, done: b7_memory.run(ctx, s, done.get("preannotation")),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), metavar="NAME",
                        help=f"run only these ({', '.join(BENCHMARKS)})")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="where latest.* go")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    parser.add_argument("--port-base", type=int, default=29000,
                        help="the services' ports: base .. base+15 (two platforms)")  # fmt: skip
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="training benchmark: cpu (gloo) or cuda (NCCL)")  # fmt: skip
    args = parser.parse_args(argv)
    configure_logging()
    # A terminated run still stops the services and Triton models it started (the session's
    # clean-up runs on SystemExit, not on a bare SIGTERM).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    names = args.only or list(BENCHMARKS)
    with tempfile.TemporaryDirectory(prefix="ctloop-bench-") as tmp:
        work = args.work or Path(tmp)
        ctx = Context(PRESETS[args.preset], work, args.port_base, args.device)
        info = machine()
        done: dict[str, dict[str, Any]] = {}
        failed: list[str] = []
        with Session(ctx) as session:
            for name in names:
                print(f"[bench] {name} ({args.preset}) ...", flush=True)
                t0 = time.monotonic()
                try:
                    done[name] = BENCHMARKS[name](ctx, session, done)
                except Exception:
                    log.exception("benchmark failed", extra={"benchmark": name})
                    failed.append(name)
                    continue
                r = done[name]
                print(
                    f"[bench] {name}: ctloop {r['ctloop_median']:.4g} {r['unit']}, "
                    f"baseline {r['baseline_median']:.4g} {r['unit']}, ratio {r['ratio']:.3g} "
                    f"({time.monotonic() - t0:.0f}s)",
                    flush=True,
                )
                write_results(list(done.values()), args.out, args.preset, info)
    if done:
        json_path, md_path = write_results(list(done.values()), args.out, args.preset, info)
        print(md_path.read_text())
        print(f"[bench] results: {json_path}, {md_path}")
    if failed:
        print(f"[bench] failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

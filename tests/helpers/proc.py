"""A long subprocess whose output is kept: when it fails or runs past its limit, the test's
message shows where it was (the last lines of its stdout and stderr), not a truncated repr."""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    def tail(self, chars: int = 4000) -> str:
        return f"--- stdout (end)\n{self.stdout[-chars:]}\n--- stderr (end)\n{self.stderr[-chars:]}"


def run_logged(cmd: list[str], *, log_dir: Path, timeout: float, **kwargs: object) -> Finished:
    """Run ``cmd`` with stdout and stderr written to ``log_dir``; on a timeout it is stopped
    (see :func:`_stop`) and the test fails with both tails."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / "stdout.log", log_dir / "stderr.log"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, text=True, start_new_session=True, **kwargs
        )  # type: ignore[call-overload]
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc)
            done = Finished(
                -9, out_path.read_text(errors="replace"), err_path.read_text(errors="replace")
            )
            raise AssertionError(
                f"{' '.join(cmd[:4])} ... still running after {timeout:.0f} s\n{done.tail()}"
            ) from None
    return Finished(
        proc.returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
    )


def _stop(proc: subprocess.Popen[str], grace_s: float = 90) -> None:
    """SIGTERM first: ``ctloop run`` and ``bench`` then stop the services they started (those run
    in their own sessions, out of reach of a signal to this group), which would otherwise keep
    consuming events and CPU through every later test. SIGKILL only if that takes too long."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

"""Where a round's ``torchrun`` runs: on this machine, or as a Kubernetes Job.

The contract every launcher keeps (``Launcher.run(config, work)``):

- ``config`` is the round's :class:`~ctloop.core.train.TrainConfig`; every path in it (the
  Decathlon ``sources``, ``init_from``, ``out``) lies inside the round's folder ``work``.
- On return ``config.out`` exists (the candidate checkpoint, written by rank 0 alone) and
  ``work / "train.log"`` holds the training log (rank 0's node).
- On failure it raises ``RuntimeError`` with the log's tail, and leaves nothing running.

:class:`LocalLauncher` is ``torchrun --standalone --nproc-per-node N`` in a subprocess (what the
training service has always done). :class:`~services.training.kubernetes.KubernetesJobLauncher`
runs the round as a Job and moves its files through the object store.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import Protocol

from ctloop.core.standby import StandbyOrder
from ctloop.core.train import TrainConfig
from ctloop.settings import Settings
from services.training.kubernetes import KubernetesJobLauncher
from services.training.round_files import TRAIN_JSON, TRAIN_LOG
from services.training.torchrun import child_env, log_tail, run_logged, torchrun_command

log = logging.getLogger("ctloop.training.launcher")


class Launcher(Protocol):
    def run(self, config: TrainConfig, work: Path) -> None: ...

    def prepare(self) -> None:
        """Get ready for the next round (between rounds; cheap when already ready)."""

    def close(self) -> None:
        """Stop what :meth:`prepare` started (the service is stopping)."""


class StandbyProcess:
    """One ``python -m ctloop.core.standby`` kept started: torch, MONAI and ctloop imported
    and warmed up (at a lower priority), waiting on its stdin for the next round (a fresh
    python spent ~5 s of every round on imports and first uses). Its output before a round
    goes to ``log_path``."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        # The rounds' thread prepares; a round may also come from a gRPC thread (RunRound).
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start one unless one is waiting (one that exited is reported and replaced)."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                return
            log.warning(
                "the standby training process exited; starting another",
                extra={"exit_code": self.proc.returncode, "log": log_tail(self.log_path, 500)},
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ctloop.core.standby"],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child_env(),
                text=True,
                start_new_session=True,  # a scheduling group of its own (see its module)
            )

    def train(self, config_path: Path, log_path: Path) -> int | None:
        """Train the round in the waiting process; its exit code (None: none was waiting, or
        it died before it took the round)."""
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None or proc.stdin is None:
            return None
        try:
            proc.stdin.write(StandbyOrder(config=config_path, log=log_path).model_dump_json())
            proc.stdin.write("\n")
            proc.stdin.close()
        except OSError:  # it died since the poll: the round runs in a fresh process
            proc.wait()
            return None
        return proc.wait()

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            if proc.stdin is not None:
                proc.stdin.close()  # end of input: it exits without training
            proc.wait(timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()


class LocalLauncher:
    """``torchrun --standalone`` on this machine, ``nproc_per_node`` processes; one process
    (``python -m ctloop.core.train``) in the ``standby`` process when one is kept."""

    def __init__(self, nproc_per_node: int, standby: StandbyProcess | None = None) -> None:
        self.nproc_per_node = nproc_per_node
        self.standby = standby if nproc_per_node == 1 else None

    def run(self, config: TrainConfig, work: Path) -> None:
        cfg_path = work / TRAIN_JSON
        cfg_path.write_text(config.model_dump_json(indent=2))
        code = None
        if self.standby is not None:
            code = self.standby.train(cfg_path, work / TRAIN_LOG)
            if code is not None:
                log.info("trained in the standby process", extra={"config": str(cfg_path)})
        if code is None:
            log.info(
                "torchrun", extra={"nproc_per_node": self.nproc_per_node, "config": str(cfg_path)}
            )
            code = run_logged(torchrun_command(cfg_path, self.nproc_per_node), work / TRAIN_LOG)
        if code != 0 or not config.out.exists():
            raise RuntimeError(f"torchrun exited {code}:\n{log_tail(work / TRAIN_LOG)}")

    def prepare(self) -> None:
        if self.standby is not None:
            self.standby.start()

    def close(self) -> None:
        if self.standby is not None:
            self.standby.close()


def launcher_for(settings: Settings) -> Launcher:
    """The launcher ``training.launcher`` names."""
    t = settings.training
    if t.launcher == "kubernetes":
        return KubernetesJobLauncher(settings)
    standby = None
    if t.standby_process and t.nproc_per_node == 1:
        standby = StandbyProcess(settings.data_dir / "training" / "standby.log")
    return LocalLauncher(t.nproc_per_node, standby)

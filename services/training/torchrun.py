"""Running ``torchrun`` for a round: its command line and a run with its output in a log file.

Shared by both launchers: :class:`~services.training.launcher.LocalLauncher` runs it on this
machine, :mod:`services.training.job` on each node of a Kubernetes Job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ctloop.settings import REPO_ROOT


@dataclass(frozen=True)
class Rendezvous:
    """c10d rendezvous of a multi-node run: node 0 hosts the store at ``endpoint``."""

    endpoint: str  # host:port
    run_id: str


def torchrun_command(
    config_path: Path,
    nproc_per_node: int,
    nnodes: int = 1,
    rendezvous: Rendezvous | None = None,
    from_env: bool = False,
) -> list[str]:
    """``python -m torch.distributed.run … -m ctloop.core.train <config>``, or without torchrun.

    One node: ``--standalone``. Several: c10d rendezvous at ``rendezvous``. ``from_env``: the
    Kubeflow operator's ``PET_*`` variables (nnodes, node rank, master address) configure it.
    One process on one node needs no launcher: ``python -m ctloop.core.train`` alone (torchrun's
    agent took 3.5 s of every round to start here; training without ``WORLD_SIZE`` is rank 0
    of 1, the same code path).
    """
    train = ["-m", "ctloop.core.train", str(config_path)]
    if not from_env and nnodes == 1 and nproc_per_node == 1:
        return [sys.executable, *train]
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if from_env:
        pass
    elif nnodes == 1:
        cmd += ["--standalone", f"--nproc-per-node={nproc_per_node}"]
    else:
        if rendezvous is None:
            raise ValueError("a multi-node run needs a rendezvous endpoint")
        cmd += [
            f"--nnodes={nnodes}",
            f"--nproc-per-node={nproc_per_node}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rendezvous.endpoint}",
            f"--rdzv-id={rendezvous.run_id}",
        ]
    return [*cmd, *train]


def child_env() -> dict[str, str]:
    """This process's environment with ctloop importable (a training process's)."""
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": f"{REPO_ROOT}:{path}" if path else str(REPO_ROOT)}


def run_logged(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` with ctloop importable, stdout and stderr into ``log_path``."""
    with open(log_path, "w") as out:
        proc = subprocess.run(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=child_env(), check=False
        )
    return proc.returncode


def log_tail(log_path: Path, chars: int = 2000) -> str:
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else "(no log)"

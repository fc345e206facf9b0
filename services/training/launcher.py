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
from pathlib import Path
from typing import Protocol

from ctloop.core.train import TrainConfig
from ctloop.settings import Settings
from services.training.kubernetes import KubernetesJobLauncher
from services.training.round_files import TRAIN_JSON, TRAIN_LOG
from services.training.torchrun import log_tail, run_logged, torchrun_command

log = logging.getLogger("ctloop.training.launcher")


class Launcher(Protocol):
    def run(self, config: TrainConfig, work: Path) -> None: ...


class LocalLauncher:
    """``torchrun --standalone`` on this machine, ``nproc_per_node`` processes."""

    def __init__(self, nproc_per_node: int) -> None:
        self.nproc_per_node = nproc_per_node

    def run(self, config: TrainConfig, work: Path) -> None:
        cfg_path = work / TRAIN_JSON
        cfg_path.write_text(config.model_dump_json(indent=2))
        log.info("torchrun", extra={"nproc_per_node": self.nproc_per_node, "config": str(cfg_path)})
        code = run_logged(torchrun_command(cfg_path, self.nproc_per_node), work / TRAIN_LOG)
        if code != 0 or not config.out.exists():
            raise RuntimeError(f"torchrun exited {code}:\n{log_tail(work / TRAIN_LOG)}")


def launcher_for(settings: Settings) -> Launcher:
    """The launcher ``training.launcher`` names."""
    if settings.training.launcher == "kubernetes":
        return KubernetesJobLauncher(settings)
    return LocalLauncher(settings.training.nproc_per_node)

"""``python -m services.training.job <s3-prefix>``: one node of a round run as a Kubernetes Job.

The training service (:class:`services.training.kubernetes.KubernetesJobLauncher`) put the round
under ``<s3-prefix>/input/`` of the data bucket: ``train.json`` with paths relative to that
folder, the Decathlon folders and the parent weights. Each node downloads it into its scratch
volume and runs ``torchrun`` (one node: standalone; several: c10d rendezvous on node 0, or the
Kubeflow operator's ``PET_*`` variables). Node 0 uploads the candidate checkpoint and its
``train.log`` under ``<s3-prefix>/output/``; other nodes upload ``train-node<i>.log``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ctloop.contracts import keys
from ctloop.core.train import TrainConfig
from ctloop.log import bind, configure_logging
from ctloop.settings import get_settings
from services.training.manifests import SCRATCH
from services.training.round_files import (
    TRAIN_JSON,
    TRAIN_LOG,
    ObjectStoreFiles,
    RoundFiles,
    rooted_config,
)
from services.training.torchrun import Rendezvous, run_logged, torchrun_command

log = logging.getLogger("ctloop.training.job")


@dataclass(frozen=True)
class JobArgs:
    prefix: str
    nproc_per_node: int
    nnodes: int
    rendezvous: Rendezvous | None
    from_env: bool
    scratch: Path


def parse_args(argv: list[str] | None = None) -> JobArgs:
    parser = argparse.ArgumentParser(
        prog="python -m services.training.job",
        description="Run one node of a ctloop training round whose files are in the object store.",
    )
    parser.add_argument("prefix", help="the round's key prefix in the data bucket")
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--rdzv-endpoint", help="host:port of the c10d store (several nodes)")
    parser.add_argument("--rdzv-id", help="the run's id (several nodes)")
    parser.add_argument(
        "--rdzv-from-env",
        action="store_true",
        help="torchrun reads PET_* variables (set by the Kubeflow training operator)",
    )
    parser.add_argument("--scratch", type=Path, default=Path(SCRATCH) / "round")
    a = parser.parse_args(argv)
    if a.nproc_per_node < 1 or a.nnodes < 1:
        parser.error("--nproc-per-node and --nnodes must be at least 1")
    rendezvous = None
    if a.nnodes > 1 and not a.rdzv_from_env:
        if not a.rdzv_endpoint:
            parser.error("several nodes need --rdzv-endpoint (or --rdzv-from-env)")
        rendezvous = Rendezvous(a.rdzv_endpoint, a.rdzv_id or a.prefix.rsplit("/", 1)[-1])
    return JobArgs(
        prefix=a.prefix.strip("/"),
        nproc_per_node=a.nproc_per_node,
        nnodes=a.nnodes,
        rendezvous=rendezvous,
        from_env=a.rdzv_from_env,
        scratch=a.scratch,
    )


def node_rank(env: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """This pod's node index: an indexed Job's completion index, or the operator's node rank."""
    for name in ("JOB_COMPLETION_INDEX", "PET_NODE_RANK"):
        if env.get(name):
            return int(env[name])
    return 0


def download_round(files: RoundFiles, prefix: str, root: Path) -> TrainConfig:
    """The round's input folder into ``root``; its config with paths inside ``root``."""
    inputs = keys.training_input(prefix)
    for key in files.keys(inputs):
        rel = key[len(inputs) :]
        if not rel or rel.startswith("/") or ".." in Path(rel).parts:
            raise ValueError(f"refusing key {key!r} outside the round folder")
        files.download(key, root / rel)
    relative = TrainConfig.model_validate_json((root / TRAIN_JSON).read_text())
    return rooted_config(relative, root)


def run_node(args: JobArgs, files: RoundFiles, rank: int) -> int:
    root = args.scratch
    root.mkdir(parents=True, exist_ok=True)
    config = download_round(files, args.prefix, root)
    config.out.parent.mkdir(parents=True, exist_ok=True)
    local_json = root / "train.local.json"
    local_json.write_text(config.model_dump_json(indent=2))
    cmd = torchrun_command(
        local_json, args.nproc_per_node, args.nnodes, args.rendezvous, args.from_env
    )
    log.info("torchrun", extra={"nnodes": args.nnodes, "nproc_per_node": args.nproc_per_node})
    log_path = root / TRAIN_LOG
    code = run_logged(cmd, log_path)
    node_log = TRAIN_LOG if rank == 0 else f"train-node{rank}.log"
    files.upload(keys.training_output(args.prefix, node_log), log_path)
    if rank == 0 and code == 0 and config.out.exists():
        checkpoint = config.out.relative_to(root).as_posix()
        files.upload(keys.training_output(args.prefix, checkpoint), config.out)
    log.info("node finished", extra={"exit_code": code})
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = get_settings()
    configure_logging(settings.log_level)
    Path(os.environ.get("TMPDIR", "/tmp")).mkdir(parents=True, exist_ok=True)
    rank = node_rank()
    with bind(prefix=args.prefix, node=rank):
        return run_node(args, ObjectStoreFiles(settings), rank)


if __name__ == "__main__":
    sys.exit(main())

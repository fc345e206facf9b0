"""``python -m ctloop.core.standby``: the next round's training process, started before the round.

A round's fresh python spent ~3 s importing torch and MONAI and another ~2 s on first uses
(torch's optimiser imports torch._dynamo), all before its first step. The training service
(:class:`services.training.launcher.StandbyProcess`) keeps one process started and warmed up
here (it prints ``{"standby": "ready", "pid": ...}`` when warm), waiting on its stdin for one
round: a :class:`StandbyOrder` as one JSON line. It then
trains that round exactly as ``python -m ctloop.core.train <config>`` would, its output going
to the round's log. An empty line or the end of input (the service stopping) ends it.

The wait is background work: the process runs in a session of its own and lowers its priority
(nice +:data:`NICE`, for its threads and for its session's scheduling group where the kernel
groups sessions, ``/proc/self/autogroup``) before it imports anything, so the imports give way to
inference and the round in hand on a shared machine. It takes its priority back when its round
comes (where it may not, a container without ``CAP_SYS_NICE``, it trains at the lower priority
and says so; inside its own pod that changes nothing against other pods).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import NoReturn, TextIO

from pydantic import BaseModel

NICE = 10
PR_SET_PDEATHSIG = 1  # prctl(2)
log = logging.getLogger("ctloop.train")


class StandbyOrder(BaseModel):
    """The round a standby process trains: its config and the log file for its output."""

    config: Path
    log: Path


def standby(orders: TextIO) -> int:
    """Wait (imported and warmed up) for one :class:`StandbyOrder` on ``orders``; train it."""
    _end_with_parent()
    before = os.nice(0)
    os.nice(NICE)
    _autogroup_nice(NICE)
    from ctloop.core import train as training  # imported at the lower priority

    _warm_up()
    print(json.dumps({"standby": "ready", "pid": os.getpid()}), flush=True)
    line = orders.readline()
    if not line.strip():
        return 0
    order = StandbyOrder.model_validate_json(line)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(order.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    from ctloop.log import configure_logging

    configure_logging()
    restored = _restore_priority(before) and _autogroup_nice(before)
    if not restored:
        log.warning("training at nice +%d: no permission to take the priority back", NICE)
    training.train(training.TrainConfig.model_validate_json(order.config.read_text()))
    return 0


def _end_with_parent() -> None:
    """SIGTERM this process when the thread that started it ends (Linux): in a session of its
    own it is outside the signals its service's process group gets, so a service killed
    mid-round does not leave its round training on."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it ended before the request took effect
        sys.exit(0)


def _restore_priority(nice: int) -> bool:
    """Every thread of this process back to ``nice`` (Linux keeps it per thread, and torch's
    threads were started at the lower priority); False without the permission."""
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]
    try:
        for tid in threads:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
    except PermissionError:
        return False
    except ProcessLookupError:  # a thread that ended meanwhile
        pass
    return True


def _autogroup_nice(nice: int) -> bool:
    """This session's scheduling group at ``nice`` (with autogroups on, the kernel shares CPUs
    between sessions first: a thread's nice counts only inside its own); True where there are
    no autogroups, False without the permission."""
    path = Path("/proc/self/autogroup")
    if not path.exists():
        return True
    try:
        path.write_text(str(nice))
    except PermissionError:
        return False
    except OSError:  # a kernel that refuses the write for another reason: nothing to restore
        return True
    return True


def _warm_up() -> None:
    """What a round's first seconds would otherwise spend on: MONAI's lazily imported
    transforms and networks, torch's first forward and backward, the optimiser and its
    schedule (the optimiser's first construction imports torch._dynamo: 1.7 s)."""
    import torch
    from monai.data import MetaTensor

    from ctloop.core.model import ModelConfig, build_network, preprocess_transforms

    cfg = ModelConfig(
        spacing=(4.0, 4.0, 4.0), patch=(16, 16, 16), channels=(4, 8), strides=(2,), num_res_units=1
    )
    image = MetaTensor(torch.rand(1, 20, 20, 20), affine=torch.eye(4))
    preprocess_transforms(cfg, with_label=False)({"image": image})
    net = build_network(cfg)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=2)
    net(torch.rand(1, 1, *cfg.patch)).sum().backward()
    opt.step()
    sched.step()


def exit_now(code: int) -> NoReturn:
    """End this process once its output is flushed, without the interpreter's teardown: with
    torch and MONAI loaded that took 1.8-2 s after a round had written everything (measured on
    2 cores), seconds every round waited for. Files are closed by then; nothing registers an
    exit handler a round needs."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(standby(sys.stdin))

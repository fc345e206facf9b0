"""The local launcher's standby process: the next round's python started and warmed up before
the round, trained in when it comes; a fresh process when it is gone; nothing left running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ctloop.core.datasets import phantom_volume, write_decathlon
from ctloop.core.model import TINY_MODEL, ModelConfig, load_checkpoint
from ctloop.core.phantom import generate_phantom
from ctloop.core.standby import NICE
from ctloop.core.train import DataSource, TrainConfig
from ctloop.settings import Settings, TrainingSettings
from services.training.launcher import LocalLauncher, StandbyProcess, launcher_for
from services.training.round_files import TRAIN_LOG
from services.training.torchrun import child_env


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("standby-data") / "ds"
    vols = [phantom_volume(generate_phantom("public", s, "tiny"), f"p{s}") for s in range(2)]
    write_decathlon(root, vols, "tiny")
    return root


def _nice(pid: int) -> int:
    """A process's nice value (field 19 of /proc/<pid>/stat, after the command's parentheses)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def _until(ok: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _round(tmp_path: Path, volumes: Path, name: str) -> tuple[TrainConfig, Path]:
    work = tmp_path / name
    work.mkdir()
    config = TrainConfig(
        model=ModelConfig(**TINY_MODEL),
        sources=[DataSource(path=volumes)],
        out=work / "candidate.pt",
        steps=2,
        meta={"round": name},
    )
    return config, work


def test_a_round_trains_in_the_standby_process_and_the_next_one_waits(tmp_path, volumes, caplog):
    caplog.set_level("INFO", "ctloop.training.launcher")
    standby = StandbyProcess(tmp_path / "standby.log")
    launcher = LocalLauncher(1, standby)
    try:
        launcher.prepare()
        waiting = standby.proc
        assert waiting is not None and waiting.poll() is None
        _until(lambda: _nice(waiting.pid) == NICE)  # it waits at the lower priority
        group = Path(f"/proc/{waiting.pid}/autogroup")
        if group.exists():  # and so does its session, where the kernel groups sessions
            _until(lambda: group.read_text().split()[-1] == str(NICE))
        ready = f'"pid": {waiting.pid}'
        _until(lambda: ready in standby.log_path.read_text())  # warm: it says so, then waits
        config, work = _round(tmp_path, volumes, "round-0001")
        launcher.run(config, work)
        assert waiting.returncode == 0  # the waiting process trained the round and exited
        assert load_checkpoint(config.out)[2]["round"] == "round-0001"
        log_lines = [json.loads(line) for line in (work / TRAIN_LOG).read_text().splitlines()]
        assert any(rec.get("msg") == "training" for rec in log_lines)  # its output: the round's
        assert "trained in the standby process" in caplog.text
        assert "no permission" not in (work / TRAIN_LOG).read_text()  # trained at nice 0
        assert standby.proc is None  # taken
        launcher.prepare()  # the next round's
        assert standby.proc is not None and standby.proc.pid != waiting.pid
    finally:
        launcher.close()
    assert waiting.poll() is not None and standby.proc is None


def test_a_standby_process_that_died_means_a_fresh_process_for_the_round(tmp_path, volumes):
    standby = StandbyProcess(tmp_path / "standby.log")
    launcher = LocalLauncher(1, standby)
    launcher.prepare()
    assert standby.proc is not None
    standby.proc.kill()
    standby.proc.wait()
    config, work = _round(tmp_path, volumes, "round-0002")
    launcher.run(config, work)  # no standby to take: python -m ctloop.core.train
    assert config.out.exists()
    launcher.prepare()  # one that exited is replaced
    try:
        assert standby.proc is not None and standby.proc.poll() is None
    finally:
        launcher.close()


def test_a_failing_round_in_the_standby_process_is_reported_with_its_log(tmp_path):
    standby = StandbyProcess(tmp_path / "standby.log")
    launcher = LocalLauncher(1, standby)
    launcher.prepare()
    work = tmp_path / "round-0003"
    work.mkdir()
    config = TrainConfig(sources=[DataSource(path=tmp_path / "missing")], out=work / "c.pt")
    try:
        with pytest.raises(RuntimeError, match=r"(?s)exited 1:\n.*missing"):
            launcher.run(config, work)
    finally:
        launcher.close()


def test_a_standby_process_told_nothing_exits_cleanly():
    proc = subprocess.run(
        [sys.executable, "-m", "ctloop.core.standby"],
        input="",
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_only_a_one_process_local_launcher_keeps_a_standby(tmp_path):
    def launcher(**training: Any) -> LocalLauncher:
        made = launcher_for(Settings(run_dir=tmp_path, training=TrainingSettings(**training)))
        assert isinstance(made, LocalLauncher)
        return made

    assert launcher().standby is not None
    assert launcher(standby_process=False).standby is None
    assert launcher(nproc_per_node=2).standby is None  # torchrun starts its own processes


def test_a_round_in_the_standby_process_ends_with_the_service_that_started_it(tmp_path, volumes):
    """The standby runs in a session of its own (its service's process group's signals miss
    it): when its service dies mid-round, the round's process ends too."""
    config, work = _round(tmp_path, volumes, "round-0004")
    config = config.model_copy(update={"steps": 100_000})  # far longer than the test
    (work / "train.json").write_text(config.model_dump_json())
    service = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from pathlib import Path\n"
            "from services.training.launcher import StandbyProcess\n"
            f"s = StandbyProcess(Path({str(tmp_path / 'standby.log')!r}))\n"
            "s.start()\n"
            "print(s.proc.pid, flush=True)\n"
            f"s.train(Path({str(work / 'train.json')!r}), Path({str(work / TRAIN_LOG)!r}))\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=child_env(),
    )
    assert service.stdout is not None
    pid = int(service.stdout.readline())
    try:
        _until(lambda: '"step' in (work / TRAIN_LOG).read_text() if (work / TRAIN_LOG).exists()
               else False, 120)  # fmt: skip
        service.kill()  # the service dies mid-round (SIGKILL: nothing of it runs after)
        service.wait()
        _until(lambda: not Path(f"/proc/{pid}").exists() or _zombie(pid), 60)
    finally:
        service.kill()
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True

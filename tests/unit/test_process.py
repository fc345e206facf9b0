"""The process manager on real child processes."""

import re
import time
from pathlib import Path

from ctloop.stack.process import ManagedProcess


def test_stop_kills_the_whole_process_group(tmp_path: Path):
    proc = ManagedProcess("sleeper", tmp_path / "state", tmp_path / "logs")
    # A parent that starts a child and ignores SIGTERM: stop must still leave nothing behind.
    proc.start(["bash", "-c", "trap '' TERM; sleep 300 & echo CHILD=$!; wait"])
    deadline = time.monotonic() + 10
    while not re.search(r"CHILD=\d+", proc.log_tail()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(re.findall(r"CHILD=(\d+)", proc.log_tail())[-1])
    assert proc.is_running()
    proc.stop(timeout_s=0.5)
    assert not proc.is_running()
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text()
    assert not proc.pid_file.exists()


def test_exited_process_is_not_running_and_its_log_is_kept(tmp_path: Path):
    proc = ManagedProcess("oneshot", tmp_path / "state", tmp_path / "logs")
    proc.start(["bash", "-c", "echo fatal: bad config; exit 3"])
    deadline = time.monotonic() + 10
    while proc.is_running() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not proc.is_running()
    assert "fatal: bad config" in proc.log_tail()

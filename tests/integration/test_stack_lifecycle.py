"""`make stack-up / stack-status / stack-down` on a second, separate stack (own run directory
and ports), so the session's stack keeps serving the other tests."""

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from ctloop.settings import REPO_ROOT

COMPONENTS = ("sqlite", "s3", "kafka", "triton")


@pytest.fixture
def second_stack_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CTLOOP_RUN_DIR": str(tmp_path / "run"),
        "CTLOOP_KAFKA__PORT": "29092",
        "CTLOOP_KAFKA__CONTROLLER_PORT": "29093",
        "CTLOOP_S3__PORT": "27070",
        "CTLOOP_TRITON__HTTP_PORT": "28000",
        "CTLOOP_TRITON__GRPC_PORT": "28001",
        "CTLOOP_TRITON__METRICS_PORT": "28002",
    }


def _make(target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", target], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400
    )


def _status_lines(out: str) -> dict[str, str]:
    """Component name -> its status line."""
    return {
        line.split()[0]: line
        for line in out.splitlines()
        if line.strip() and line.split()[0] in COMPONENTS
    }


def _pids(lines: dict[str, str]) -> dict[str, str]:
    return {
        name: line.split("pid ")[1].split()[0] for name, line in lines.items() if "pid " in line
    }


def _alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _processes_under(run_dir: str) -> list[str]:
    """Processes whose command line or working directory is inside ``run_dir``."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        try:
            cwd = os.readlink(proc / "cwd")
        except OSError:
            cwd = ""
        if (run_dir in cmdline or cwd.startswith(run_dir)) and _alive(int(proc.name)):
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


def test_up_status_down_leaves_nothing_behind(second_stack_env):
    env = second_stack_env
    pids: dict[str, str] = {}
    try:
        up = _make("stack-up", env)
        assert up.returncode == 0, up.stdout + up.stderr

        status = _make("stack-status", env)
        assert status.returncode == 0, status.stdout + status.stderr
        lines = _status_lines(status.stdout)
        assert set(lines) == set(COMPONENTS)
        assert all(" healthy " in line for line in lines.values()), status.stdout

        # A second stack-up is a no-op: the same processes keep running.
        pids.update(_pids(lines))
        again = _make("stack-up", env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "started" not in again.stdout
        after = _status_lines(_make("stack-status", env).stdout)
        assert _pids(after) == pids
        first_pids = dict(pids)

        # A crashed component is reported, with the tail of its log, and status fails.
        os.kill(int(first_pids["s3"]), signal.SIGKILL)
        crashed = _make("stack-status", env)
        assert crashed.returncode != 0
        assert "crashed" in _status_lines(crashed.stdout)["s3"]
        assert "last lines of its log" in crashed.stdout

        # stack-up brings back only what is down.
        revived = _make("stack-up", env)
        assert revived.returncode == 0, revived.stdout + revived.stderr
        final = _make("stack-status", env)
        assert final.returncode == 0
        pids.update(_pids(_status_lines(final.stdout)))
    finally:
        down = _make("stack-down", env)
    assert down.returncode == 0, down.stdout + down.stderr
    stopped = _status_lines(_make("stack-status", env).stdout)
    assert all(" stopped " in stopped[n] for n in ("s3", "kafka", "triton")), stopped
    assert _processes_under(env["CTLOOP_RUN_DIR"]) == []
    for name, pid in pids.items():
        assert not _alive(int(pid)), f"{name} (pid {pid}) still running"


def test_a_port_held_by_another_process_is_refused_not_reported_as_started(second_stack_env):
    """An orphan of an earlier run (or any other program) on a component's port would answer
    the health check while the component itself fails to bind: `stack up` must say so instead
    of reporting the component started."""
    port = int(second_stack_env["CTLOOP_S3__PORT"])
    with socket.create_server(("127.0.0.1", port)) as squatter:
        squatter.listen()
        up = _make("stack-up", second_stack_env)
        assert up.returncode != 0
        assert f"s3: 127.0.0.1:{port} already answers" in up.stdout + up.stderr
        run_dir = second_stack_env["CTLOOP_RUN_DIR"]
        assert not (Path(run_dir) / "state" / "s3.pid").exists()
        assert _processes_under(run_dir) == []
    _make("stack-down", second_stack_env)

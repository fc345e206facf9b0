"""`ctloop services up / status / down`: the services as real processes on the local stack."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from ctloop.core.blobs import nifti_gz_bytes
from ctloop.core.phantom import generate_phantom
from ctloop.settings import REPO_ROOT

ENV = {
    **os.environ,
    "CTLOOP_SERVICES__INGEST__HTTP_PORT": "28600",
    "CTLOOP_SERVICES__INGEST__GRPC_PORT": "28601",
    "CTLOOP_SERVICES__INFERENCE__HTTP_PORT": "28602",
    "CTLOOP_SERVICES__INFERENCE__GRPC_PORT": "28603",
}


def _ctloop(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctloop.cli", *args],
        cwd=REPO_ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _pid(out: str, name: str) -> int:
    line = next(line for line in out.splitlines() if line.startswith(name))
    return int(line.split("pid ")[1].split()[0])


def _services_come_up_healthy() -> dict[str, int]:
    """`services up` starts them and `status` shows the stack and both services healthy.
    Returns the services' pids."""
    up = _ctloop("services", "up")
    assert up.returncode == 0, up.stdout + up.stderr
    status = _ctloop("status")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()}
    for name in ("s3", "kafka", "triton", "ingest", "inference"):
        assert " healthy " in lines[name], status.stdout
    return {name: _pid(status.stdout, name) for name in ("ingest", "inference")}


def _ingest_takes_a_volume_and_inference_is_ready(unique: str) -> None:
    """The ingest API wants a token, takes an upload from the admin and describes it."""
    p = generate_phantom("clinical-a", 21, "tiny")
    run_dir = Path(os.environ.get("CTLOOP_RUN_DIR", REPO_ROOT / ".ctloop"))
    token = (run_dir / "admin-token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    assert httpx.get("http://127.0.0.1:28600/v1/volumes").status_code == 401
    r = httpx.post(
        "http://127.0.0.1:28600/v1/volumes",
        headers=auth,
        data={"site_id": "site-life", "dataset": "clinical", "volume_id": f"life-{unique}"},
        files={"file": ("ct.nii.gz", nifti_gz_bytes(p.image, p.affine), "application/gzip")},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    assert httpx.get(f"http://127.0.0.1:28600/v1/volumes/life-{unique}", headers=auth).json()[
        "shape"
    ] == list(p.image.shape)
    assert httpx.get("http://127.0.0.1:28602/readyz").json()["ready"] is True


def _admin_works_from_the_command_line(unique: str) -> None:
    """Administration from the command line, as the admin of .ctloop/admin-token."""
    api = ["admin", "--api", "http://127.0.0.1:28600"]
    assert _ctloop(*api, "site", f"site-{unique}").returncode == 0
    made = _ctloop(*api, "user", f"u-{unique}", "--role", "annotator", "--site", f"site-{unique}")
    assert made.returncode == 0, made.stderr
    issued = _ctloop(*api, "token", "issue", f"u-{unique}", "--label", "cli")
    assert issued.returncode == 0, issued.stderr
    user_token = json.loads(issued.stdout)["token"]
    mine = httpx.get(
        "http://127.0.0.1:28600/v1/sites", headers={"Authorization": f"Bearer {user_token}"}
    ).json()
    assert [x["id"] for x in mine] == [f"site-{unique}"]
    dup = _ctloop(*api, "site", f"site-{unique}")
    assert dup.returncode == 1 and "exists" in dup.stderr
    assert "ctloop_predictions_total" in httpx.get("http://127.0.0.1:28602/metrics").text


def _a_crashed_service_fails_status_until_restarted(pids: dict[str, int]) -> None:
    """A crashed service makes `ctloop status` fail, naming it; `services up` restarts it."""
    os.kill(pids["inference"], signal.SIGKILL)
    crashed = _ctloop("status")
    assert crashed.returncode != 0 and "crashed" in crashed.stdout
    assert _ctloop("services", "up").returncode == 0


def _services_stopped_gracefully(down: subprocess.CompletedProcess[str]) -> None:
    """`services down` succeeded, SIGTERM ended ingest gracefully and `status` says stopped."""
    assert down.returncode == 0, down.stdout + down.stderr
    log = Path(os.environ.get("CTLOOP_RUN_DIR", REPO_ROOT / ".ctloop")) / "logs" / "ingest.log"
    assert '"msg": "service stopped"' in log.read_text()  # SIGTERM ended it gracefully
    after = _ctloop("status")
    assert "ingest    stopped" in after.stdout and after.returncode != 0


def test_services_run_answer_and_stop_gracefully(unique):
    try:
        pids = _services_come_up_healthy()
        _ingest_takes_a_volume_and_inference_is_ready(unique)
        _admin_works_from_the_command_line(unique)
        _a_crashed_service_fails_status_until_restarted(pids)
    finally:
        down = _ctloop("services", "down")
    _services_stopped_gracefully(down)

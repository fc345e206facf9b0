"""Nothing is read before authentication (issue 18, finding 1): a real ingest app on a real
socket answers a request that declares a huge body and stalls, from its headers alone, and
closes the connection; the server's temporary space and memory do not grow."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from ctloop.auth import ensure_admin_token
from ctloop.db import create_schema
from tests.helpers.net import free_port

DECLARED = 500 * 1024 * 1024  # what the request says it will send
SENT = 1024 * 1024 + 200_000  # what it sends before it stalls (past Starlette's 1 MiB spool)
ANSWER_WITHIN_S = 3.0  # "at once", with room for a loaded machine
RSS_GROWTH_LIMIT = 50 * 1024 * 1024
BOUNDARY = "ctloopboundary"
LIMIT_MB = 4  # this ingest's upload limit (the default, 1 GiB, is too much to send in a test)

SERVE = """
import uvicorn
from ctloop.settings import Settings
from services.ingest.app import create_app
uvicorn.run(create_app(Settings()), host="127.0.0.1", port={port}, http="httptools",
            log_level="warning")
"""


@pytest.fixture(scope="module")
def ingest(tmp_path_factory) -> Iterator[dict[str, object]]:
    """The ingest app under uvicorn (httptools, as the service runs it) in its own process,
    with its own database and an empty temporary folder."""
    root = tmp_path_factory.mktemp("authfirst")
    spool = root / "tmp"
    spool.mkdir()
    url = f"sqlite:///{root / 'workflow.db'}"
    create_schema(url)
    token = ensure_admin_token(url, root / "admin-token")
    port = free_port()
    env = {**os.environ, "CTLOOP_DB__URL": url, "CTLOOP_RUN_DIR": str(root), "TMPDIR": str(spool)}
    env["CTLOOP_SERVICES__MAX_UPLOAD_MB"] = str(LIMIT_MB)
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE.format(port=port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "ingest did not start"
            time.sleep(0.2)
        yield {"port": port, "pid": proc.pid, "spool": spool, "token": token}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _stalled_upload(port: int, path: str, headers: dict[str, str], declared: int) -> dict:
    """Send a request's headers and SENT bytes of a multipart body that declares ``declared``
    bytes, then stall; return the answer, how long it took from the headers, and whether the
    server closed the connection after it."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(ANSWER_WITHIN_S + 5)
    head = [
        f"POST {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        f"Content-Length: {declared}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="ct.nii.gz"'
        "\r\nContent-Type: application/gzip\r\n\r\n"
    ).encode()
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    started = time.monotonic()

    def send_body() -> None:  # may block or break once the server stops reading: fine
        with contextlib.suppress(OSError):
            sock.sendall(part + b"\x1f\x8b" + os.urandom(SENT))

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    received = b""
    try:
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        elapsed = time.monotonic() - started
        head_raw, _, body = received.partition(b"\r\n\r\n")
        lines = head_raw.decode("latin-1").split("\r\n")
        answer = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        while len(body) < int(answer.get("content-length", "0")):
            body += sock.recv(65536)
        try:
            closed = sock.recv(65536) == b""
        except ConnectionResetError:
            closed = True
    finally:
        sock.close()
        sender.join(timeout=10)
    return {
        "status": int(lines[0].split()[1]),
        "headers": answer,
        "json": json.loads(body),
        "elapsed": elapsed,
        "closed": closed,
    }


@pytest.mark.parametrize(
    ("credential", "code"),
    [
        (None, "unauthenticated"),
        ("Bearer ctl_forged-token-value-that-is-on-no-list", "bad_token"),
        ("Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJtYWxsb3J5In0.Zm9yZ2Vk", "bad_token"),
    ],
    ids=["anonymous", "forged-api-token", "forged-jwt"],
)
def test_a_huge_upload_without_valid_credentials_is_refused_from_its_headers(
    ingest, credential, code
):
    headers = {"Authorization": credential} if credential else {}
    rss_before = _rss(ingest["pid"])
    got = _stalled_upload(ingest["port"], "/v1/volumes", headers, DECLARED)
    assert got["status"] == 401 and got["json"]["code"] == code, got
    assert got["elapsed"] < ANSWER_WITHIN_S, got["elapsed"]
    assert got["headers"]["www-authenticate"].startswith("Bearer")
    assert got["headers"]["connection"] == "close" and got["closed"]
    assert list(ingest["spool"].iterdir()) == []  # nothing spooled
    assert _rss(ingest["pid"]) - rss_before < RSS_GROWTH_LIMIT


def test_a_signed_in_upload_declared_over_the_limit_is_refused_before_it_is_read(ingest):
    """2 GiB declared, over the limit: refused without reading any."""
    headers = {"Authorization": f"Bearer {ingest['token']}"}
    got = _stalled_upload(ingest["port"], "/v1/volumes", headers, 2 * 1024**3)
    assert got["status"] == 413 and got["json"]["code"] == "too_large", got
    assert got["elapsed"] < ANSWER_WITHIN_S and got["closed"]
    assert list(ingest["spool"].iterdir()) == []


def test_public_routes_stay_open_and_take_only_small_bodies(ingest):
    base = f"http://127.0.0.1:{ingest['port']}"
    assert httpx.get(f"{base}/healthz").status_code == 200
    assert httpx.get(f"{base}/metrics").status_code == 200
    assert httpx.get(f"{base}/ui/").status_code == 200
    assert httpx.get(f"{base}/v1/workbench/config").status_code == 200
    assert httpx.get(f"{base}/auth/").status_code == 200
    # MONAI Label's sign-in form is public: a small wrong one is its own 401, a huge one is
    # refused from its declared length.
    wrong = httpx.post(f"{base}/auth/token", data={"username": "x", "password": "ctl_nope"})
    assert wrong.status_code == 401
    got = _stalled_upload(ingest["port"], "/auth/token", {}, DECLARED)
    assert got["status"] == 413 and got["elapsed"] < ANSWER_WITHIN_S
    # A path no route serves needs a token too; with one it is the API's 404.
    assert httpx.get(f"{base}/v1/nothing-here").status_code == 401
    admin = {"Authorization": f"Bearer {ingest['token']}"}
    assert httpx.get(f"{base}/v1/nothing-here", headers=admin).json()["code"] == "not_found"
    assert httpx.get(f"{base}/v1/volumes", headers=admin).status_code == 200


def test_a_signed_in_chunked_upload_is_cut_off_when_it_passes_the_limit(ingest):
    """A chunked body declares no length: it is counted as it arrives and refused (413, the
    connection closed) once past the limit (+ the form's slack), not spooled to its end."""
    sock = socket.create_connection(("127.0.0.1", ingest["port"]))
    sock.settimeout(20)
    head = [
        "POST /v1/volumes HTTP/1.1",
        f"Host: 127.0.0.1:{ingest['port']}",
        f"Content-Type: multipart/form-data; boundary={BOUNDARY}",
        "Transfer-Encoding: chunked",
        f"Authorization: Bearer {ingest['token']}",
    ]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
    part = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="ct.nii.gz"'
        "\r\nContent-Type: application/gzip\r\n\r\n"
    ).encode()
    limit = (LIMIT_MB + 1) * 1024 * 1024  # the upload limit and the form's slack
    sent, stopped = 0, False

    def send_chunk(data: bytes) -> None:
        sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    try:
        send_chunk(part)
        while sent < 8 * limit:  # far more than the limit, 256 KiB at a time
            send_chunk(os.urandom(256 * 1024))
            sent += 256 * 1024
    except OSError:  # the server answered and closed: it stopped reading
        stopped = True
    received = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            received += chunk
    sock.close()
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.split()[1] == b"413", received[:300]
    head_raw, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in head_raw.lower()
    assert json.loads(body)["code"] == "too_large"
    assert stopped and sent < 8 * limit, sent  # the server closed: it did not read it all
    deadline = time.monotonic() + 10  # what the parser had spooled is removed with the request
    while list(ingest["spool"].iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert list(ingest["spool"].iterdir()) == []

"""The real servers of the embedded stack, each run as a local process.

A component knows how to prepare its data directory once, the command that runs it, how to tell
it is healthy and what to do once it is (create topics, buckets, databases). Nothing here mocks a
server: Kafka is Apache Kafka, S3 is Versity Gateway, Triton is NVIDIA's tritonserver, SQL is
SQLite or PostgreSQL.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    import psycopg

from ctloop.settings import Settings
from ctloop.stack.process import ManagedProcess


class StackError(RuntimeError):
    """A component could not be set up or started; the message says what to do."""


@dataclass
class Health:
    ok: bool
    detail: str


class Component(ABC):
    """One server of the local stack."""

    name: str
    needs_process = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.process = ManagedProcess(self.name, settings.state_dir, settings.logs_dir)

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir / self.name

    def prepare(self) -> None:  # noqa: B027 - optional hook
        """One-time initialisation of the data directory (idempotent)."""

    @abstractmethod
    def command(self) -> list[str]: ...

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @abstractmethod
    def health(self) -> Health: ...

    def after_start(self) -> None:  # noqa: B027 - optional hook
        """Runs once the component is healthy (create topics, buckets, ...); idempotent."""

    def describe(self) -> str:
        """Where a client reaches this component."""
        return ""

    def listens(self) -> list[tuple[str, int]]:
        """The addresses the component's process binds: free before it starts, or another
        process (an orphan of an earlier run, another program) would answer its health checks
        while ours fails to bind."""
        return []

    def check_ports_free(self) -> None:
        taken = [f"{h}:{p}" for h, p in self.listens() if port_open(h, p, timeout_s=0.5)]
        if taken:
            raise StackError(
                f"{self.name}: {', '.join(taken)} already answers, but not from a process this "
                f"stack started (no live pid in {self.process.pid_file}). Stop whatever holds it "
                "(`ss -ltnp` shows the owner) or give this stack other ports (CTLOOP_* settings)."
            )


def port_open(host: str, port: int, timeout_s: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- Kafka
class KafkaBroker(Component):
    """Single-node KRaft broker+controller from the Apache Kafka jars (fetched by `make setup`)."""

    name = "kafka"

    @property
    def libs(self) -> Path:
        return self.settings.tools_dir / "kafka" / "libs"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "server.properties"

    def _java(self, main: str, *args: str) -> list[str]:
        return [
            "java",
            f"-Xmx{self.settings.kafka.heap}",
            f"-Xms{self.settings.kafka.heap}",
            "-XX:+UseG1GC",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.xml'}",
            "-cp",
            f"{self.libs}/*",
            main,
            *args,
        ]

    def prepare(self) -> None:
        if not self.libs.is_dir() or not any(self.libs.glob("kafka_2.13-*.jar")):
            raise StackError(f"Kafka jars missing in {self.libs}: run `make setup`")
        k = self.settings.kafka
        log_dir = self.data_dir / "log"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            "\n".join(
                [
                    "process.roles=broker,controller",
                    "node.id=1",
                    f"controller.quorum.bootstrap.servers={k.host}:{k.controller_port}",
                    f"listeners=PLAINTEXT://{k.host}:{k.port},CONTROLLER://{k.host}:{k.controller_port}",
                    f"advertised.listeners=PLAINTEXT://{k.host}:{k.port}",
                    "controller.listener.names=CONTROLLER",
                    "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
                    "inter.broker.listener.name=PLAINTEXT",
                    f"log.dirs={log_dir}",
                    f"num.partitions={k.topic_partitions}",
                    "offsets.topic.replication.factor=1",
                    "transaction.state.log.replication.factor=1",
                    "transaction.state.log.min.isr=1",
                    "share.coordinator.state.topic.replication.factor=1",
                    "share.coordinator.state.topic.min.isr=1",
                    "group.initial.rebalance.delay.ms=0",
                    # Events are the record of what happened: keep them (a week by default).
                    "log.retention.hours=168",
                    "auto.create.topics.enable=false",
                    "",
                ]
            )
        )
        (self.data_dir / "log4j2.xml").write_text(_LOG4J2_XML)
        if (log_dir / "meta.properties").exists():
            return
        cluster_id = _kafka_cluster_id()
        result = subprocess.run(
            self._java(
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "-t",
                cluster_id,
                "-c",
                str(self.config_path),
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise StackError(f"formatting Kafka storage failed:\n{result.stdout}{result.stderr}")

    def command(self) -> list[str]:
        return self._java("kafka.Kafka", str(self.config_path))

    def listens(self) -> list[tuple[str, int]]:
        k = self.settings.kafka
        return [(k.host, k.port), (k.host, k.controller_port)]

    def health(self) -> Health:
        k = self.settings.kafka
        if not port_open(k.host, k.port):
            return Health(False, f"port {k.port} closed")
        from ctloop.bus import broker_ready

        ok, detail = broker_ready(self.settings)
        return Health(ok, detail)

    def after_start(self) -> None:
        from ctloop.bus import ensure_topics

        ensure_topics(self.settings)

    def describe(self) -> str:
        return f"bootstrap {self.settings.kafka.bootstrap_servers}"


def _kafka_cluster_id() -> str:
    """16 random bytes, URL-safe base64 without padding, never starting with "-": the storage
    tool's argument parser would take such an id for an option (1 start in 64 failed so)."""
    import base64

    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


_LOG4J2_XML = """<Configuration status="WARN">
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="[%d] %p %m (%c)%n"/>
    </Console>
  </Appenders>
  <Loggers>
    <Logger name="kafka" level="INFO"/>
    <Logger name="org.apache.kafka" level="WARN"/>
    <Root level="WARN"><AppenderRef ref="STDOUT"/></Root>
  </Loggers>
</Configuration>
"""


# --------------------------------------------------------------------------- S3
class S3Gateway(Component):
    """Versity Gateway over a posix directory, with bucket versioning."""

    name = "s3"

    @property
    def binary(self) -> Path:
        return self.settings.tools_dir / "bin" / "versitygw"

    def prepare(self) -> None:
        if not self.binary.exists():
            raise StackError(f"{self.binary} missing: run `make setup`")
        (self.data_dir / "objects").mkdir(parents=True, exist_ok=True)
        (self.data_dir / "versions").mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        s = self.settings.s3
        return [
            str(self.binary),
            "--port",
            f"{s.host}:{s.port}",
            "--region",
            s.region,
            "--quiet",
            "posix",
            "--versioning-dir",
            str(self.data_dir / "versions"),
            str(self.data_dir / "objects"),
        ]

    def env(self) -> dict[str, str]:
        s = self.settings.s3
        return {
            **os.environ,
            "ROOT_ACCESS_KEY": s.access_key,
            "ROOT_SECRET_KEY": s.secret_key.get_secret_value(),
        }

    def listens(self) -> list[tuple[str, int]]:
        return [(self.settings.s3.host, self.settings.s3.port)]

    def health(self) -> Health:
        s = self.settings.s3
        if not port_open(s.host, s.port):
            return Health(False, f"port {s.port} closed")
        from ctloop.storage import ObjectStore

        try:
            buckets = ObjectStore(self.settings).list_buckets()
        except Exception as exc:  # any client error means "not healthy yet"
            return Health(False, f"S3 request failed: {exc}")
        return Health(True, f"{len(buckets)} buckets")

    def after_start(self) -> None:
        from ctloop.storage import ObjectStore

        ObjectStore(self.settings).ensure_buckets()

    def describe(self) -> str:
        s = self.settings.s3
        return f"{s.url} buckets {s.bucket}, {s.model_bucket}"


# --------------------------------------------------------------------------- Triton
class TritonServer(Component):
    """NVIDIA tritonserver from the nvidia-pytriton wheel, python backend, S3 model repository."""

    name = "triton"

    @property
    def pytriton_dir(self) -> Path:
        # Located, not imported: pytriton's own Python API is not used (nor installable here).
        spec = importlib.util.find_spec("pytriton")
        if spec is None or not spec.submodule_search_locations:
            raise StackError("nvidia-pytriton is not installed: run `make setup`")
        return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"

    @property
    def backends_dir(self) -> Path:
        return self.settings.tools_dir / "triton" / "backends"

    def prepare(self) -> None:
        """Assemble a backends folder whose python stub matches this interpreter."""
        src = self.pytriton_dir
        py = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = src / "python_backend_stubs" / py / "triton_python_backend_stub"
        if not stub.exists():
            raise StackError(f"no Triton python backend stub for Python {py} in {src}")
        dest = self.backends_dir / "python"
        dest.mkdir(parents=True, exist_ok=True)
        for item in (
            src / "backends" / "python" / "libtriton_python.so",
            src / "backends" / "python" / "triton_python_backend_utils.py",
            stub,
        ):
            target = dest / item.name
            if not target.exists() or target.stat().st_size != item.stat().st_size:
                shutil.copy2(item, target)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        from ctloop.storage import ObjectStore

        # Triton refuses a repository "directory" with no object under it.
        ObjectStore(self.settings).ensure_model_repository()

    @property
    def model_repository(self) -> str:
        s3, t = self.settings.s3, self.settings.triton
        return f"s3://{s3.url}/{s3.model_bucket}/{t.model_prefix}"

    def command(self) -> list[str]:
        t = self.settings.triton
        return [
            str(self.pytriton_dir / "bin" / "tritonserver"),
            f"--model-repository={self.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={self.backends_dir}",
            f"--http-address={t.host}",
            f"--http-port={t.http_port}",
            f"--grpc-address={t.host}",
            f"--grpc-port={t.grpc_port}",
            f"--metrics-address={t.host}",
            f"--metrics-port={t.metrics_port}",
            "--allow-metrics=true",
            "--allow-gpu-metrics=false",
            # A broken model must not take the server (and the models it serves) down.
            "--exit-on-error=false",
            "--strict-readiness=false",
            "--log-verbose=0",
        ]

    def env(self) -> dict[str, str]:
        s3 = self.settings.s3
        venv_bin = str(Path(sys.executable).parent)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        pytriton_libs = str(self.pytriton_dir.parent.parent / "nvidia_pytriton.libs")
        ld = [libdir, pytriton_libs, os.environ.get("LD_LIBRARY_PATH", "")]
        return {
            **os.environ,
            # The stub then runs as this virtualenv's python: model.py can import torch, monai.
            "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
            # Without the interpreter's own libpython first, the stub loads the system one.
            "LD_LIBRARY_PATH": ":".join(p for p in ld if p),
            "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key.get_secret_value(),
            "AWS_DEFAULT_REGION": s3.region,
            "CTLOOP_RUN_DIR": str(self.settings.run_dir),
        }

    def listens(self) -> list[tuple[str, int]]:
        t = self.settings.triton
        return [(t.host, t.http_port), (t.host, t.grpc_port), (t.host, t.metrics_port)]

    def health(self) -> Health:
        t = self.settings.triton
        try:
            r = httpx.get(f"http://{t.host}:{t.http_port}/v2/health/ready", timeout=2.0)
        except httpx.HTTPError as exc:
            return Health(False, f"not answering: {type(exc).__name__}")
        return Health(r.status_code == 200, f"ready={r.status_code == 200}")

    def describe(self) -> str:
        t = self.settings.triton
        return f"grpc {t.grpc_url}, http {t.host}:{t.http_port}, repo {self.model_repository}"


# --------------------------------------------------------------------------- SQL
class SqliteDatabase(Component):
    """SQLite needs no server: it is healthy when its file opens and answers."""

    name = "sqlite"
    needs_process = False

    def command(self) -> list[str]:
        return []

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def health(self) -> Health:
        from ctloop.db import ping

        try:
            ping(self.settings.database_url)
        except Exception as exc:
            return Health(False, f"cannot open: {exc}")
        return Health(True, "answers")

    def after_start(self) -> None:
        from ctloop.db import create_schema

        create_schema(self.settings.database_url)

    def describe(self) -> str:
        return self.settings.database_url


class PostgresDatabase(Component):
    """PostgreSQL from Debian's package, its cluster under the run directory."""

    name = "postgres"

    @property
    def bindir(self) -> Path:
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        if not found:
            raise StackError("PostgreSQL is not installed: run `make setup` (Debian postgresql)")
        return found[-1].parent

    def _as_owner(self, argv: list[str]) -> list[str]:
        # PostgreSQL refuses to run as root; run it as the `postgres` system user then.
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def prepare(self) -> None:
        pgdata = self.data_dir / "pgdata"
        if (pgdata / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        pwfile = self.data_dir / "pwfile"
        pwfile.write_text(self.settings.db.pg_password.get_secret_value() + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.data_dir, "postgres", "postgres")
            shutil.chown(pwfile, "postgres", "postgres")
        pwfile.chmod(0o600)
        result = subprocess.run(
            self._as_owner(
                [
                    str(self.bindir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    self.settings.db.pg_user,
                    f"--pwfile={pwfile}",
                    "--auth=scram-sha-256",
                    "--encoding=UTF8",
                    "--no-locale",
                ]
            ),
            capture_output=True,
            text=True,
        )
        pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise StackError(f"initdb failed:\n{result.stdout}{result.stderr}")

    def command(self) -> list[str]:
        d = self.settings.db
        return self._as_owner(
            [
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir / "pgdata"),
                "-h",
                d.pg_host,
                "-p",
                str(d.pg_port),
                "-k",
                str(self.data_dir),
            ]
        )

    def listens(self) -> list[tuple[str, int]]:
        return [(self.settings.db.pg_host, self.settings.db.pg_port)]

    def health(self) -> Health:
        d = self.settings.db
        if not port_open(d.pg_host, d.pg_port):
            return Health(False, f"port {d.pg_port} closed")
        import psycopg

        try:
            with self.connect(connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.Error as exc:
            return Health(False, f"not accepting connections: {exc}".strip())
        return Health(True, "accepting connections")

    def after_start(self) -> None:
        d = self.settings.db
        with self.connect(autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (d.pg_database,)
            ).fetchone()
            if not exists:
                conn.execute(f'CREATE DATABASE "{d.pg_database}"')
        from ctloop.db import create_schema

        create_schema(self.settings.database_url)

    def connect(self, dbname: str = "postgres", **options: Any) -> psycopg.Connection[Any]:
        """A connection as the stack's PostgreSQL user (to ``postgres`` unless told)."""
        import psycopg

        d = self.settings.db
        return psycopg.connect(
            host=d.pg_host,
            port=d.pg_port,
            user=d.pg_user,
            password=d.pg_password.get_secret_value(),
            dbname=dbname,
            **options,
        )

    def describe(self) -> str:
        d = self.settings.db
        return f"postgresql://{d.pg_user}@{d.pg_host}:{d.pg_port}/{d.pg_database}"


def stack_components(settings: Settings) -> list[Component]:
    """The embedded components in start order (Triton reads its model repository from S3).

    A component whose external endpoint is configured (an existing database, S3 service,
    Kafka cluster or Triton) is not run locally.
    """
    components: list[Component] = []
    if settings.db.url is None:
        components.append(
            PostgresDatabase(settings)
            if settings.db.backend == "postgresql"
            else SqliteDatabase(settings)
        )
    if settings.s3.external_endpoint is None:
        components.append(S3Gateway(settings))
    if settings.kafka.external_bootstrap is None:
        components.append(KafkaBroker(settings))
    if settings.triton.external_url is None:
        components.append(TritonServer(settings))
    return components

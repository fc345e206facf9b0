"""The PostgreSQL server of the embedded stack: a cluster under the run directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctloop.stack.components.base import Component, Health, StackError, port_open

if TYPE_CHECKING:
    import psycopg


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

"""The S3 server of the embedded stack: Versity Gateway over a local directory."""

from __future__ import annotations

import os
from pathlib import Path

from ctloop.stack.components.base import Component, Health, StackError, port_open


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

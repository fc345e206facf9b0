"""The S3 server of the embedded stack: Versity Gateway over a local directory, with its internal
IAM: one account per ctloop service, held to its grants by bucket policies (ctloop/s3_grants.py).
Each account's keys are written to ``<run_dir>/s3-credentials/<identity>.json`` (0600), where the
services' settings find them; the root credential stays with the stack and admin tools."""

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
        self.iam_dir.mkdir(mode=0o700, exist_ok=True)

    @property
    def iam_dir(self) -> Path:
        """The gateway's accounts (its internal IAM: users.json)."""
        return self.data_dir / "iam"

    @property
    def credentials_dir(self) -> Path:
        return self.settings.s3.credentials_dir or self.settings.run_dir / "s3-credentials"

    def command(self) -> list[str]:
        s = self.settings.s3
        return [
            str(self.binary),
            "--port",
            f"{s.host}:{s.port}",
            "--region",
            s.region,
            "--quiet",
            "--iam-dir",
            str(self.iam_dir),
            # Versity Gateway v1.8.0's IAM cache keeps an updated account's secret as a view
            # of the admin request's buffer, which the HTTP server reuses: after a second
            # provisioning (update-user), requests of that account fail SignatureDoesNotMatch
            # until the entry expires (120 s). Without the cache each request reads the small
            # users.json instead.
            "--iam-cache-disable",
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
        """Buckets, then an account and policies per service (kept across restarts: each
        account keeps the secret in its credentials file). A gateway started without
        ``--iam-dir`` (by an older ctloop) has no accounts: everyone keeps the root key."""
        from ctloop.s3_grants import (
            IDENTITIES,
            Credential,
            credential_file,
            new_credential,
            read_credential,
            write_credential,
        )
        from ctloop.s3_provision import NoIam, provision
        from ctloop.storage import ObjectStore

        s = self.settings.s3
        root = Credential(s.access_key, s.secret_key.get_secret_value())
        users = {
            i: read_credential(credential_file(self.credentials_dir, i)) or new_credential(i)
            for i in IDENTITIES
        }
        try:
            provision(self.settings, "versitygw", root, users)
        except NoIam:
            ObjectStore(self.settings).ensure_buckets()
            return
        for identity, credential in users.items():
            write_credential(credential_file(self.credentials_dir, identity), credential)

    def describe(self) -> str:
        s = self.settings.s3
        return f"{s.url} buckets {s.bucket}, {s.model_bucket}"

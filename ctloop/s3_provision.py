"""Create the per-service S3 identities of :mod:`ctloop.s3_grants` on the object store, with
the root credential: the buckets (versioned) and the model repository prefix, one user per
service, and the policies that hold each to its grants.

Two servers, one table:

- **Versity Gateway** (the local stack; the chart's ``minio.server=versitygw``): users through
  its admin API (what ``versitygw admin create-user/update-user`` sends: a SigV4-signed PATCH on
  the S3 port; role ``user``, which alone grants nothing) and one bucket policy per bucket whose
  principals are the users' access keys. The gateway needs ``--iam-dir`` (its internal IAM);
  without it, it is a single root user and :class:`NoIam` says so.
- **MinIO** (the chart's default): users with ``MinioAdmin.user_add`` and an identity policy
  each (``policy_add`` + ``attach_policy``), the same as ``mc admin user add`` / ``mc admin
  policy create`` / ``mc admin policy attach``.

``python -m ctloop.s3_provision --server minio|versitygw`` is the chart's provisioning Job: the
root keys in CTLOOP_S3__ACCESS_KEY/SECRET_KEY, each identity's keys in
``CTLOOP_S3_<IDENTITY>_ACCESS_KEY`` / ``..._SECRET_KEY``. Idempotent: a user that exists gets
its secret set again, policies are replaced.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

import httpx
from minio.credentials import Credentials
from minio.signer import sign_v4_s3

from ctloop.s3_grants import IDENTITIES, Credential, bucket_policy, identity_policy, policy_text
from ctloop.settings import Settings

log = logging.getLogger("ctloop.s3_provision")

Server = Literal["versitygw", "minio"]


class NoIam(RuntimeError):
    """The gateway runs as a single root user (started without ``--iam-dir``)."""


class VersityAdmin:
    """The gateway's admin API, signed with the root credential."""

    def __init__(self, settings: Settings, root: Credential) -> None:
        self.url = settings.s3.url
        self.region = settings.s3.region
        self.root = root

    def _call(self, path: str, body: str) -> httpx.Response:
        data = body.encode()
        url = urlsplit(self.url + path)
        sha = hashlib.sha256(data).hexdigest()
        now = datetime.now(UTC)
        headers: dict[str, str | list[str] | tuple[str]] = {
            "Host": url.netloc,
            "x-amz-content-sha256": sha,
            "x-amz-date": now.strftime("%Y%m%dT%H%M%SZ"),
        }
        creds = Credentials(self.root.access_key, self.root.secret_key)
        signed = sign_v4_s3(
            method="PATCH",
            url=url,
            region=self.region,
            headers=headers,
            credentials=creds,
            content_sha256=sha,
            date=now,
        )
        sent = {k: str(v) for k, v in signed.items()}
        r = httpx.patch(self.url + path, headers=sent, content=data, timeout=30.0)
        if r.status_code == 501 and "XAdminMethodNotSupported" in r.text:
            raise NoIam(f"{self.url} runs without --iam-dir: one root user, no accounts")
        return r

    def put_user(self, credential: Credential) -> None:
        """Create the user (role ``user``), or set its secret if it exists."""
        access, secret = escape(credential.access_key), escape(credential.secret_key)
        r = self._call(
            "/create-user",
            f"<Account><Access>{access}</Access><Secret>{secret}</Secret>"
            "<Role>user</Role></Account>",
        )
        if r.status_code == 409:  # XAdminUserExists
            r = self._call(
                f"/update-user?access={credential.access_key}",
                f"<MutableProps><Secret>{secret}</Secret><Role>user</Role></MutableProps>",
            )
        if r.status_code >= 300:
            raise RuntimeError(f"gateway refused user {credential.access_key}: {r.text[:300]}")


def provision_versitygw(settings: Settings, root: Credential, users: dict[str, Credential]) -> None:
    """Users, then the bucket policies naming them (a policy's principals must exist)."""
    from ctloop.storage import ObjectStore

    admin = VersityAdmin(settings, root)
    for credential in users.values():
        admin.put_user(credential)
    store = ObjectStore(settings)
    access = {identity: c.access_key for identity, c in users.items()}
    for bucket, name in (("data", settings.s3.bucket), ("models", settings.s3.model_bucket)):
        policy = bucket_policy(settings, bucket, access)  # type: ignore[arg-type]
        store.client.set_bucket_policy(name, policy_text(policy))


def provision_minio(settings: Settings, root: Credential, users: dict[str, Credential]) -> None:
    from minio import MinioAdmin
    from minio.credentials import StaticProvider

    admin = MinioAdmin(
        endpoint=settings.s3.endpoint,
        credentials=StaticProvider(root.access_key, root.secret_key),
        region=settings.s3.region,
        secure=settings.s3.secure,
    )
    for identity, credential in users.items():
        name = f"ctloop-{identity}"
        admin.user_add(credential.access_key, credential.secret_key)
        admin.policy_add(name, policy=identity_policy(settings, identity))
        try:
            admin.attach_policy([name], user=credential.access_key)
        except Exception as exc:  # already attached: MinIO answers an error, nothing changes
            if "already" not in str(exc).lower():
                raise


def provision(
    settings: Settings, server: Server, root: Credential, users: dict[str, Credential]
) -> None:
    """Buckets and model repository (as root), then ``users`` and their policies."""
    from ctloop.storage import ObjectStore

    store = ObjectStore(settings)
    store.ensure_buckets()
    store.ensure_model_repository()
    if server == "versitygw":
        provision_versitygw(settings, root, users)
    else:
        provision_minio(settings, root, users)
    log.info("S3 identities provisioned", extra={"server": server, "identities": sorted(users)})


def credentials_from_env(environ: dict[str, str]) -> dict[str, Credential]:
    """Each identity's keys from ``CTLOOP_S3_<IDENTITY>_ACCESS_KEY`` / ``_SECRET_KEY``."""
    found = {}
    for identity in IDENTITIES:
        prefix = f"CTLOOP_S3_{identity.upper()}_"
        access, secret = environ.get(prefix + "ACCESS_KEY"), environ.get(prefix + "SECRET_KEY")
        if not access or not secret:
            raise SystemExit(f"{prefix}ACCESS_KEY and {prefix}SECRET_KEY must be set")
        found[identity] = Credential(access, secret)
    return found


def main(argv: list[str] | None = None) -> int:
    from ctloop.log import configure_logging
    from ctloop.provision import until_done

    parser = argparse.ArgumentParser(prog="python -m ctloop.s3_provision", description=__doc__)
    parser.add_argument("--server", choices=["minio", "versitygw"], required=True)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to keep trying")
    args = parser.parse_args(argv)
    os.environ.pop("CTLOOP_S3__IDENTITY", None)  # this runs as root
    settings = Settings()
    configure_logging(settings.log_level)
    root = Credential(settings.s3.access_key, settings.s3.secret_key.get_secret_value())
    users = credentials_from_env(dict(os.environ))

    def step(s: Settings) -> None:
        provision(s, args.server, root, users)

    until_done("s3 identities", step, settings, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())

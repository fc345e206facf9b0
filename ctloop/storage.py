"""The object store (S3: Versity Gateway here, MinIO or any S3 service in a cluster)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import urllib3
from minio import Minio
from minio.commonconfig import ENABLED
from minio.error import S3Error
from minio.versioningconfig import VersioningConfig

from ctloop.contracts import keys
from ctloop.settings import Settings

# What S3 services answer for a key that is not there.
MISSING = ("NoSuchKey", "NoSuchObject", "NotFound")


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    version_id: str | None
    etag: str | None


class ObjectStore:
    def __init__(self, settings: Settings) -> None:
        s = settings.s3
        self.settings = settings
        # Bounded: while the store is down a call fails within seconds (the API answers 503)
        # instead of hanging on minio's default retries.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=120.0),
            maxsize=16,
            retries=urllib3.Retry(
                total=3, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504]
            ),
        )
        # This process's own identity (ctloop/s3_grants.py) where it has one, else root.
        self.identity = settings.s3_identity
        access_key, secret_key = settings.s3_credential()
        self.client = Minio(
            s.endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=s.secure,
            region=s.region,
            http_client=http,
        )

    @property
    def buckets(self) -> tuple[str, str]:
        return self.settings.s3.bucket, self.settings.s3.model_bucket

    def list_buckets(self) -> list[str]:
        return [b.name for b in self.client.list_buckets()]

    def ensure_buckets(self) -> None:
        """Create the data and model buckets with versioning on (idempotent). A service
        identity may not: it checks that its buckets are there and its grants work (the
        provisioning made them), and raises until they do."""
        if self.identity is not None:
            self.check_grants()
            return
        for bucket in self.buckets:
            if not self.client.bucket_exists(bucket):
                try:
                    self.client.make_bucket(bucket)
                except S3Error as exc:
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
            if self.client.get_bucket_versioning(bucket).status != ENABLED:
                self.client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))

    def check_grants(self) -> None:
        """A read this identity is granted, in each bucket it uses, answers "no such key":
        the bucket exists and the identity's policy is in place (else S3Error)."""
        from ctloop.s3_grants import GRANTS, Verb, bucket_name, key_pattern

        assert self.identity is not None
        probed: set[str] = set()
        for g in GRANTS[self.identity]:
            bucket = bucket_name(self.settings, g.bucket)
            if Verb.READ in g.verbs and bucket not in probed:
                # a GET (not a HEAD, whose answer has no error code) tells NoSuchBucket apart
                self.get_optional(bucket, key_pattern(self.settings, g.keys).replace("*", "probe"))
                probed.add(bucket)

    def ensure_model_repository(self) -> None:
        """Make the Triton repository prefix exist (S3 has no empty folders); a service
        identity leaves it to the provisioning."""
        if self.identity is not None:
            return
        s = self.settings
        key = keys.model_repository_readme(s.triton.model_prefix)
        if not self.exists(s.s3.model_bucket, key):
            text = b"ctloop Triton model repository: <model>/config.pbtxt, <model>/<version>/\n"
            self.put_bytes(s.s3.model_bucket, key, text, "text/plain")

    def put_bytes(
        self,
        bucket: str,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
    ) -> StoredObject:
        result = self.client.put_object(
            bucket, key, io.BytesIO(data), len(data), content_type=content_type
        )
        return StoredObject(bucket, key, result.version_id, result.etag)

    def delete_version(self, bucket: str, key: str, version_id: str | None) -> None:
        """Remove one version of ``key`` for good (no delete marker); the others stay."""
        self.client.remove_object(bucket, key, version_id=version_id)

    def get_bytes(self, bucket: str, key: str, version_id: str | None = None) -> bytes:
        response = self.client.get_object(bucket, key, version_id=version_id)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def sha256(self, bucket: str, key: str) -> str:
        """Hex SHA-256 of the latest version of ``key``, streamed (weights can be large)."""
        digest = hashlib.sha256()
        response = self.client.get_object(bucket, key)
        try:
            for chunk in response.stream(1 << 20):
                digest.update(chunk)
        finally:
            response.close()
            response.release_conn()
        return digest.hexdigest()

    def get_optional(self, bucket: str, key: str) -> bytes | None:
        """The latest version of ``key``, or None if there is none."""
        try:
            return self.get_bytes(bucket, key)
        except S3Error as exc:
            if exc.code in MISSING:
                return None
            raise

    def exists(self, bucket: str, key: str) -> bool:
        try:
            self.client.stat_object(bucket, key)
        except S3Error as exc:
            if exc.code in MISSING:
                return False
            raise
        return True

    def versions(self, bucket: str, key: str) -> list[str]:
        """Version ids of ``key``, newest first (the order S3 lists them in)."""
        return [
            str(o.version_id)
            for o in self.client.list_objects(bucket, prefix=key, include_version=True)
            if o.object_name == key and o.version_id is not None and not o.is_delete_marker
        ]

    def list_keys(self, bucket: str, prefix: str) -> list[str]:
        return [
            str(o.object_name)
            for o in self.client.list_objects(bucket, prefix=prefix, recursive=True)
        ]

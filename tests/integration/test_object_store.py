"""The S3 gateway, spoken to with the minio client exactly as the services do."""

import os

from minio.commonconfig import ENABLED

from ctloop.contracts import keys
from ctloop.storage import ObjectStore


def test_data_and_model_buckets_exist_with_versioning_on(settings):
    store = ObjectStore(settings)
    for bucket in (settings.s3.bucket, settings.s3.model_bucket):
        assert store.client.bucket_exists(bucket)
        assert store.client.get_bucket_versioning(bucket).status == ENABLED


def test_object_reads_back_byte_identical(settings, unique):
    store = ObjectStore(settings)
    data = os.urandom(3 * 1024 * 1024 + 17)  # above the client's multipart-free fast path
    key = keys.volume_image("site-a", f"vol-{unique}")
    stored = store.put_bytes(settings.s3.bucket, key, data)
    assert stored.version_id
    assert store.get_bytes(settings.s3.bucket, key) == data


def test_second_version_keeps_the_first(settings, unique):
    store = ObjectStore(settings)
    key = keys.volume_image("site-a", f"vol-{unique}")
    first = store.put_bytes(settings.s3.bucket, key, b"revision one")
    second = store.put_bytes(settings.s3.bucket, key, b"revision two")
    assert first.version_id != second.version_id
    assert store.get_bytes(settings.s3.bucket, key) == b"revision two"
    assert store.get_bytes(settings.s3.bucket, key, version_id=first.version_id) == b"revision one"
    assert store.versions(settings.s3.bucket, key) == [second.version_id, first.version_id]

"""The Triton model repository in S3: how a version is published, and checked before it is
served (serving it: :mod:`ctloop.triton_serving`).

Layout (keys from :mod:`ctloop.contracts.keys`)::

    <model_prefix>/<model>/config.pbtxt
    <model_prefix>/<model>/<version>/model.py, weights..., manifest.json

Versions are immutable: publishing a version that exists is refused. ``manifest.json`` is
written last, so a version without one is incomplete (a crash mid-publish) and never served.
It records the SHA-256 of every file of the version (``files``). A version is loaded with its
files in the load request (:meth:`ModelRepository.verified_files`: read by the inference
service, each checked against its digest), so Triton runs exactly the bytes that were checked,
and a ``model.py`` or weights changed in the bucket after publishing is refused instead of run
(issue 18, finding 4); a file added there is never loaded. :meth:`ModelRepository.
verify_version` checks a whole folder (exactly those files, those digests).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from datetime import UTC, datetime
from typing import Any, NoReturn

from minio.error import S3Error

from ctloop.contracts import keys
from ctloop.contracts.payloads import BlobRef
from ctloop.contracts.triton import ModelSpec
from ctloop.core.packaging import NETWORK_PY, pipeline_files, pipeline_spec
from ctloop.settings import Settings
from ctloop.storage import ObjectStore

log = logging.getLogger("ctloop.model_repository")


class VersionExists(RuntimeError):
    pass


class ModelLoadFailed(RuntimeError):
    pass


class TamperedModel(ModelLoadFailed):
    """A version whose files are not what its manifest recorded at publish: never loaded."""


class ModelRepository:
    def __init__(self, settings: Settings, store: ObjectStore | None = None) -> None:
        self.settings = settings
        self.store = store or ObjectStore(settings)
        self.bucket = settings.s3.model_bucket
        self.prefix = settings.triton.model_prefix

    def publish_version(
        self,
        spec: ModelSpec,
        version: int,
        files: dict[str, bytes],
        manifest: dict[str, Any],
    ) -> None:
        """Upload ``files`` as version ``version`` of ``spec.name``, then its manifest."""
        manifest_key = keys.model_manifest(self.prefix, spec.name, version)
        if self.store.exists(self.bucket, manifest_key):
            raise VersionExists(f"{spec.name} version {version} is already published")
        self.store.put_bytes(
            self.bucket, keys.model_config(self.prefix, spec.name), spec.config_pbtxt().encode()
        )
        for name, data in files.items():
            self.store.put_bytes(
                self.bucket, keys.model_file(self.prefix, spec.name, version, name), data
            )
        digests = {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}
        document = {"model": spec.name, "version": version, **manifest, "files": digests}
        body = json.dumps(document, indent=2)
        if NETWORK_PY in files:  # served beside the pipeline on CPU: it must be there first
            self.publish_pipeline()
        self.store.put_bytes(self.bucket, manifest_key, body.encode(), "application/json")

    def publish_pipeline(self) -> int:
        """The pipeline model's version with this code's ``model.py``: the latest published
        one when its files are these (and still what was published), else a new version
        (versions stay immutable)."""
        name = self.settings.triton.pipeline_model
        files = pipeline_files()
        digests = {n: hashlib.sha256(data).hexdigest() for n, data in files.items()}
        for _ in range(3):  # another publisher may take the same number at the same time
            versions = self.published_versions(name)
            if versions and self.manifest(name, versions[-1]).get("files") == digests:
                with contextlib.suppress(TamperedModel):  # logged; replaced by a new version
                    self.verify_version(name, versions[-1])
                    return versions[-1]
            version = (versions[-1] if versions else 0) + 1
            try:
                self.publish_version(
                    pipeline_spec(name), version, files, {"role": "pipeline", **_created()}
                )
            except VersionExists:
                continue
            log.info("pipeline model published", extra={"model": name, "model_version": version})
            return version
        raise RuntimeError(f"could not publish {name}: its versions kept changing")

    def pipeline_version(self) -> int | None:
        """The pipeline version to serve: the latest published (None: nothing published one)."""
        versions = self.published_versions(self.settings.triton.pipeline_model)
        return versions[-1] if versions else None

    def verify_version(self, model: str, version: int) -> None:
        """Refuse (:class:`TamperedModel`, logged) a version whose folder is not exactly the
        files its manifest recorded at publish, with those SHA-256 digests: what Triton would
        load now (the latest version of each key) is what was published."""
        recorded, where = self._recorded(model, version)
        folder = keys.model_version_prefix(self.prefix, model, version)
        present = {k[len(folder) :] for k in self.store.list_keys(self.bucket, folder)}
        extra = sorted(present - set(recorded) - {keys.MODEL_MANIFEST})
        missing = sorted(set(recorded) - present)
        if extra or missing:
            self._refuse(
                model, version, f"{where}: files added {extra}, missing {missing} since publish"
            )
        for name, digest in sorted(recorded.items()):
            found = self.store.sha256(self.bucket, folder + name)
            self._check(model, version, f"{where}{name}", found, digest)

    def verified_files(
        self, model: str, version: int, names: list[str] | None = None
    ) -> dict[str, bytes]:
        """A published version's files (``names``, those of them it has; all by default), each
        checked against the SHA-256 its manifest recorded at publish: what a load sends to
        Triton (:meth:`TritonModels.load_on`), so what runs is what was checked. Refuses
        (:class:`TamperedModel`, logged) a file that changed, went missing, or a manifest
        without digests."""
        recorded, where = self._recorded(model, version)
        files: dict[str, bytes] = {}
        for name in sorted(recorded if names is None else set(names) & set(recorded)):
            try:
                data = self.store.get_bytes(
                    self.bucket, keys.model_file(self.prefix, model, version, name)
                )
            except S3Error as exc:  # gone since publish (or unreadable): not loaded
                self._refuse(model, version, f"{where}{name} cannot be read: {exc}")
            found = hashlib.sha256(data).hexdigest()
            self._check(model, version, f"{where}{name}", found, recorded[name])
            files[name] = data
        return files

    def _recorded(self, model: str, version: int) -> tuple[dict[str, str], str]:
        """The file digests a version's manifest recorded, and where the version is."""
        recorded = self.manifest(model, version).get("files")
        where = f"s3://{self.bucket}/{keys.model_version_prefix(self.prefix, model, version)}"
        if not isinstance(recorded, dict) or not recorded:
            self._refuse(
                model,
                version,
                f"{where} has no file digests in its manifest "
                "(published before digests were recorded): publish it again",
            )
        return recorded, where

    def _check(self, model: str, version: int, file: str, found: str, digest: str) -> None:
        if found != digest:
            self._refuse(
                model,
                version,
                f"{file} changed after publish (sha256 {found}, the manifest recorded {digest})",
            )

    def _refuse(self, model: str, version: int, why: str) -> NoReturn:
        log.error(
            "model version refused: its files are not what was published",
            extra={"model": model, "model_version": version, "reason": why},
        )
        raise TamperedModel(f"{model} v{version} not loaded: {why}")

    def published_versions(self, model: str) -> list[int]:
        """Complete (manifest-bearing) versions, ascending."""
        root = keys.model_root(self.prefix, model)
        found = set()
        for key in self.store.list_keys(self.bucket, root):
            parts = key[len(root) :].split("/")
            if len(parts) == 2 and parts[1] == keys.MODEL_MANIFEST and parts[0].isdigit():
                found.add(int(parts[0]))
        return sorted(found)

    def manifest(self, model: str, version: int) -> dict[str, Any]:
        key = keys.model_manifest(self.prefix, model, version)
        return dict(json.loads(self.store.get_bytes(self.bucket, key)))

    def manifest_ref(self, model: str, version: int) -> BlobRef:
        """Where a version's manifest is (what ``model.published`` points at)."""
        return BlobRef(bucket=self.bucket, key=keys.model_manifest(self.prefix, model, version))

    def weights(self, model: str, version: int) -> bytes:
        """A published version's checkpoint (a round fine-tunes from it)."""
        return self.store.get_bytes(self.bucket, keys.model_weights(self.prefix, model, version))

    def onnx(self, model: str, version: int) -> bytes | None:
        """A published version's ONNX export, as published: None when it has none, or when
        its bytes are not those the manifest recorded (logged; nothing is built on them)."""
        manifest = self.manifest(model, version)
        name = (manifest.get("runtimes") or {}).get("onnxruntime")
        recorded = (manifest.get("files") or {}).get(name) if isinstance(name, str) else None
        if not isinstance(name, str) or not isinstance(recorded, str):
            return None
        data = self.store.get_bytes(self.bucket, keys.model_file(self.prefix, model, version, name))
        if hashlib.sha256(data).hexdigest() != recorded:
            log.error(
                "model file changed after publish: not used",
                extra={"model": model, "model_version": version, "file": name},
            )
            return None
        return data


def _created() -> dict[str, str]:
    return {"created_at": datetime.now(UTC).isoformat()}

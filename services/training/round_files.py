"""A round as files: the names of its config and log, its config with paths relative to its
folder (and back), the files it reads, and moving them to and from the object store.

A round's folder holds its ``train.json``, the Decathlon folders it trains on and the parent
weights; a launcher that runs the round elsewhere (:mod:`services.training.kubernetes`) ships
that folder and :mod:`services.training.job` rebuilds it on the other side.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

from ctloop.core.train import DataSource, TrainConfig
from ctloop.settings import Settings

log = logging.getLogger("ctloop.training.launcher")

TRAIN_JSON = "train.json"
TRAIN_LOG = "train.log"


def relative_config(config: TrainConfig, work: Path) -> TrainConfig:
    """``config`` with its paths relative to ``work`` (so it can run in another folder)."""

    def rel(p: Path) -> Path:
        try:
            return p.resolve().relative_to(work.resolve())
        except ValueError:
            raise ValueError(f"{p} is not inside the round folder {work}") from None

    return config.model_copy(
        update={
            "sources": [s.model_copy(update={"path": rel(s.path)}) for s in config.sources],
            "out": rel(config.out),
            "init_from": rel(config.init_from) if config.init_from else None,
        }
    )


def rooted_config(config: TrainConfig, root: Path) -> TrainConfig:
    """The inverse of :func:`relative_config`: relative paths resolved inside ``root``."""
    return config.model_copy(
        update={
            "sources": [DataSource(path=root / s.path, limit=s.limit) for s in config.sources],
            "out": root / config.out,
            "init_from": root / config.init_from if config.init_from else None,
        }
    )


def input_files(config: TrainConfig, root: Path) -> list[Path]:
    """Every file a relative ``config`` reads, relative to ``root``: its sources' folders and
    the parent weights."""
    files: list[Path] = []
    for source in config.sources:
        folder = root / source.path
        files += sorted(p.relative_to(root) for p in folder.rglob("*") if p.is_file())
    if config.init_from is not None:
        files.append(config.init_from)
    return files


class RoundFiles(Protocol):
    """Moving a round's files to and from the object store (a :class:`ctloop.storage.ObjectStore`
    adapter in production)."""

    def upload(self, key: str, path: Path) -> None: ...
    def download(self, key: str, path: Path) -> bool: ...  # False if the key does not exist
    def keys(self, prefix: str) -> list[str]: ...
    def delete(self, keys: list[str]) -> None: ...


class ObjectStoreFiles:
    """:class:`RoundFiles` on the data bucket, streaming files (volumes are large)."""

    def __init__(self, settings: Settings) -> None:
        from ctloop.storage import ObjectStore

        self.store = ObjectStore(settings)
        self.bucket = settings.s3.bucket

    def upload(self, key: str, path: Path) -> None:
        self.store.client.fput_object(self.bucket, key, str(path))

    def download(self, key: str, path: Path) -> bool:
        if not self.store.exists(self.bucket, key):
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store.client.fget_object(self.bucket, key, str(path))
        return True

    def keys(self, prefix: str) -> list[str]:
        return self.store.list_keys(self.bucket, prefix)

    def delete(self, keys: list[str]) -> None:
        from minio.deleteobjects import DeleteObject

        errors = self.store.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys])
        for err in errors:
            log.warning("could not delete", extra={"key": err.name, "error": err.message})

"""A round's volumes as Decathlon folders, the form :mod:`ctloop.core.train` reads.

Each volume comes with its label (public) or latest usable annotation (clinical), both fetched
from S3 where the workflow (ingest, over gRPC) says they are. What an annotator skipped or did
not review travels as the entry's ``partial`` note, so training drops those voxels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from ctloop.contracts.payloads import BlobRef
from ctloop.core.blobs import nifti_from_gz
from ctloop.core.datasets import Volume, write_decathlon
from ctloop.storage import ObjectStore
from services.training.policy import NothingToTrain
from services.training.workflow import WorkflowClient


def materialise(
    store: ObjectStore, workflow: WorkflowClient, root: Path, volume_ids: list[str]
) -> None:
    """``volume_ids`` (with their label or latest annotation and its review) as a Decathlon
    folder at ``root``."""
    known = {
        v.volume_id: v
        for dataset in ("public", "clinical")
        for v in workflow.training_volumes(dataset)
    }
    volumes, partial = [], {}
    for vid in volume_ids:
        if vid not in known:
            raise NothingToTrain(f"{vid} has neither a label nor an annotation")
        tv = known[vid]
        image = _load(store, tv.image)
        label = _load(store, tv.label)
        volumes.append(
            Volume(
                id=vid,
                image=np.asarray(image.dataobj, np.float32),
                affine=np.asarray(image.affine),
                label=np.asarray(label.dataobj, np.uint8),
            )
        )
        if tv.review:
            partial[vid] = tv.review
    write_decathlon(root, volumes, name=root.name)
    if partial:
        _note_partial(root / "dataset.json", partial)


def _load(store: ObjectStore, ref: BlobRef) -> nib.Nifti1Image:
    return nifti_from_gz(store.get_bytes(ref.bucket, ref.key, ref.version_id))


def _note_partial(spec_path: Path, partial: dict[str, dict[str, Any]]) -> None:
    spec = json.loads(spec_path.read_text())
    for entry in spec["training"]:
        vid = Path(entry["image"]).name.removesuffix(".nii.gz")
        if vid in partial:
            entry["partial"] = partial[vid]
    spec_path.write_text(json.dumps(spec, indent=2))

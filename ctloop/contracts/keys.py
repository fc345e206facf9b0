"""The S3 key layout. Every service builds keys here and nowhere else.

Blobs are immutable: a new annotation revision or model version gets a new key.
The Triton model repository lives in its own bucket under ``<model_prefix>/``:
``<model_prefix>/<model>/config.pbtxt`` and ``<model_prefix>/<model>/<version>/...``.
"""

from __future__ import annotations

import re

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class InvalidKeyPart(ValueError):
    """An identifier that would not make a safe, unambiguous S3 key."""


def safe_id(value: str, what: str = "id") -> str:
    """``value`` if it is a safe single key segment (letters, digits, ``._-``; no ``..``)."""
    if not _SAFE_ID.match(value) or ".." in value:
        raise InvalidKeyPart(f"{what} {value!r} must match {_SAFE_ID.pattern} without '..'")
    return value


def volume_image(site: str, volume_id: str) -> str:
    return f"volumes/{safe_id(site, 'site')}/{safe_id(volume_id, 'volume id')}/image.nii.gz"


def volume_label(site: str, volume_id: str) -> str:
    """The label that came with a labelled (public) volume."""
    return f"volumes/{safe_id(site, 'site')}/{safe_id(volume_id, 'volume id')}/label.nii.gz"


def volume_model_input(site: str, volume_id: str, preprocessing: str) -> str:
    """A volume resampled to a model's grid and windowed (derived, re-creatable from the
    image), per preprocessing digest."""
    return (
        f"volumes/{safe_id(site, 'site')}/{safe_id(volume_id, 'volume id')}/"
        f"model-input/{safe_id(preprocessing, 'preprocessing')}.npz"
    )


def annotation_mask(site: str, volume_id: str, revision: int) -> str:
    return (
        f"annotations/{safe_id(site, 'site')}/{safe_id(volume_id, 'volume id')}/"
        f"rev-{int(revision):06d}/mask.nii.gz"
    )


def prediction_mask(volume_id: str, model: str, version: int) -> str:
    return (
        f"predictions/{safe_id(volume_id, 'volume id')}/{safe_id(model, 'model')}/"
        f"v{int(version)}/mask.nii.gz"
    )


def prediction_info(volume_id: str, model: str, version: int) -> str:
    """JSON beside a pre-annotation: its uncertainty, timing and model version."""
    return (
        prediction_mask(volume_id, model, version).removesuffix("mask.nii.gz") + "prediction.json"
    )


def model_config(model_prefix: str, model: str) -> str:
    return f"{model_prefix}/{safe_id(model, 'model')}/config.pbtxt"


def model_version_prefix(model_prefix: str, model: str, version: int) -> str:
    if int(version) < 1:
        raise InvalidKeyPart(f"model version must be >= 1, got {version}")
    return f"{model_prefix}/{safe_id(model, 'model')}/{int(version)}/"

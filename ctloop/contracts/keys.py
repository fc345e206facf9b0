"""The S3 key layout. Every service builds keys here and nowhere else.

Blobs are immutable: a new annotation revision or model version gets a new key.

Data bucket::

    volumes/<site>/<volume>/image.nii.gz, label.nii.gz, model-input/<preprocessing>.npz
    annotations/<site>/<volume>/rev-<revision>/mask.nii.gz
    predictions/<volume>/<model>/v<version>/mask.nii.gz, prediction.json
    volumes/_sessions/<site>/<session>/image.nii.gz    (a MONAI Label session, temporary:
    predictions/_sessions/<site>/<session>/<model>/v<version>/mask.nii.gz  gone with it)
    <training s3_prefix>/<job>/input/..., output/...   (a round run as a Kubernetes Job)
    reports/<run>/<file>, reports/latest                (transfer-run reports)
    metrics/<name>/snapshot.json                        (the metrics service's state)
    metrics/<name>/set-aside/<stamp>.json               (a snapshot it could not use)
    bench/<tag>/<run>/<part>.nii.gz                     (benchmark baselines, deleted after)

Model bucket (the Triton model repository, under ``<model_prefix>/``)::

    <model_prefix>/README.txt
    <model_prefix>/<model>/config.pbtxt
    <model_prefix>/<model>/<version>/model.py, weights.pt, manifest.json
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


# A MONAI Label session's blobs sit beside volumes and predictions under ``_sessions``, a
# segment no site or volume id can be (ids start with a letter or digit): the grants that let
# ingest and inference handle volumes and masks cover them, and the gateway's bucket policy
# (about 4 KB at most) barely grows.
SESSIONS = "_sessions"


def session_image(site: str, session_id: str) -> str:
    """A MONAI Label session's CT (an image segmented outside the loop; deleted, every
    version, when the session ends)."""
    return (
        f"volumes/{SESSIONS}/{safe_id(site, 'site')}/{safe_id(session_id, 'session id')}/"
        "image.nii.gz"
    )


def session_masks(site: str, session_id: str) -> str:
    """The prefix of a session's masks."""
    return f"predictions/{SESSIONS}/{safe_id(site, 'site')}/{safe_id(session_id, 'session id')}/"


def session_mask(site: str, session_id: str, model: str, version: int) -> str:
    return (
        session_masks(site, session_id) + f"{safe_id(model, 'model')}/v{int(version)}/mask.nii.gz"
    )


MODEL_MANIFEST = "manifest.json"  # written last: a version without one is incomplete
MODEL_WEIGHTS = "weights.pt"
MODEL_ONNX = "model.onnx"  # the same network for ONNX Runtime (Triton's CPU instances)


def model_repository_readme(model_prefix: str) -> str:
    """A note that makes the (otherwise empty) repository prefix exist."""
    return f"{model_prefix}/README.txt"


def model_root(model_prefix: str, model: str) -> str:
    """Everything of one model: its config and its version folders."""
    return f"{model_prefix}/{safe_id(model, 'model')}/"


def model_config(model_prefix: str, model: str) -> str:
    return model_root(model_prefix, model) + "config.pbtxt"


def model_version_prefix(model_prefix: str, model: str, version: int) -> str:
    if int(version) < 1:
        raise InvalidKeyPart(f"model version must be >= 1, got {version}")
    return f"{model_root(model_prefix, model)}{int(version)}/"


def model_file(model_prefix: str, model: str, version: int, name: str) -> str:
    """One file of a model version (``model.py``, weights, the manifest)."""
    return model_version_prefix(model_prefix, model, version) + safe_id(name, "file name")


def model_manifest(model_prefix: str, model: str, version: int) -> str:
    return model_file(model_prefix, model, version, MODEL_MANIFEST)


def model_weights(model_prefix: str, model: str, version: int) -> str:
    return model_file(model_prefix, model, version, MODEL_WEIGHTS)


def training_job_prefix(s3_prefix: str, job: str) -> str:
    """A training round's folder while it runs as a Kubernetes Job (deleted afterwards)."""
    return f"{s3_prefix.strip('/')}/{job}"


def training_input(job_prefix: str, relative: str = "") -> str:
    """A file the round's pods read (``relative`` to the folder the service trained in)."""
    return f"{job_prefix}/input/{relative}"


def training_output(job_prefix: str, relative: str) -> str:
    """A file a round's pod wrote back: the candidate checkpoint, its logs."""
    return f"{job_prefix}/output/{relative}"


REPORTS_PREFIX = "reports/"


def report_file(run_id: str, name: str) -> str:
    """One file of a transfer run's report (``report.json``, ``report.md``, plots)."""
    return f"{REPORTS_PREFIX}{run_id}/{name}"


def report_latest() -> str:
    """Holds the id of the newest run that has a report."""
    return f"{REPORTS_PREFIX}latest"


def report_runs(listed: list[str]) -> list[str]:
    """The run ids among the keys listed under :data:`REPORTS_PREFIX`, sorted."""
    return sorted({k.split("/")[1] for k in listed if k.count("/") == 2})


METRICS_PREFIX = "metrics/"


def metrics_snapshot(name: str) -> str:
    """The metrics service's newest snapshot: its state and the Kafka offsets it covers."""
    return f"{METRICS_PREFIX}{safe_id(name, 'snapshot name')}/snapshot.json"


def metrics_snapshot_aside(name: str, stamp: str) -> str:
    """Where a snapshot the service could not use (unreadable, from another Kafka cluster) is
    copied before it is replaced, to be looked at later."""
    return (
        f"{METRICS_PREFIX}{safe_id(name, 'snapshot name')}/set-aside/{safe_id(stamp, 'stamp')}.json"
    )


def bench_blob(tag: str, run: str, part: str) -> str:
    """A blob a benchmark's baseline writes (not the platform's data; removed after)."""
    return f"bench/{tag}/{run}/{part}.nii.gz"

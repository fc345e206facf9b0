"""Least privilege in the object store: one S3 identity per service, and exactly the buckets,
key patterns and verbs each one needs (issue 18, finding 4).

:data:`GRANTS` is the one table. The local stack's gateway (Versity Gateway bucket policies,
:mod:`ctloop.stack.components.s3_gateway`), the chart's provisioning Job (``python -m
ctloop.s3_provision``: MinIO users with identity policies, or the gateway again) and the tests
all read it; nothing else spells a grant. Each row says why the service needs it, from the
calls it makes today (see the module of each service).

What no identity may do: delete an annotation revision or a published model file
(:data:`IMMUTABLE`, an explicit Deny on top of the missing Allow). Only the root credential (the
stack itself, the provisioning Job) creates buckets, sets versioning or writes policies.

Key patterns are relative to the bucket; ``*`` matches any characters, ``/`` included (as in
AWS policies); ``{models}`` is the Triton repository prefix (``triton.model_prefix``) and
``{jobs}`` the training rounds' folder (``training.kubernetes.s3_prefix``).
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ctloop.settings import Settings

Bucket = Literal["data", "models"]


class Verb(StrEnum):
    READ = "read"  # GetObject (any version), HeadObject
    WRITE = "write"  # PutObject, multipart uploads (and aborting one), a copy's destination
    LIST = "list"  # ListObjects under the pattern's prefix; "*": the bucket (and HeadBucket)
    DELETE = "delete"  # DeleteObject without a version: a delete marker on a versioned bucket
    DELETE_VERSION = "delete-version"  # removes one version for good


OBJECT_ACTIONS: dict[Verb, tuple[str, ...]] = {
    Verb.READ: ("s3:GetObject", "s3:GetObjectVersion"),
    Verb.WRITE: ("s3:PutObject", "s3:AbortMultipartUpload"),
    Verb.DELETE: ("s3:DeleteObject",),
    Verb.DELETE_VERSION: ("s3:DeleteObjectVersion",),
}


@dataclass(frozen=True)
class Grant:
    bucket: Bucket
    keys: str  # key pattern (see the module docstring)
    verbs: frozenset[Verb]
    why: str


def _g(bucket: Bucket, keys: str, verbs: set[Verb], why: str) -> Grant:
    return Grant(bucket, keys, frozenset(verbs), why)


R, W, L, D, DV = Verb.READ, Verb.WRITE, Verb.LIST, Verb.DELETE, Verb.DELETE_VERSION

GRANTS: dict[str, tuple[Grant, ...]] = {
    "ingest": (
        _g("data", "volumes/*", {R, W}, "uploads (image, label); reads them for the API"),
        _g(
            "data",
            "volumes/*/image.nii.gz",
            {DV},
            "an upload refused after its early write removes that version (uploads.EarlyPut); "
            "a MONAI Label session's image (volumes/_sessions/...) goes when it ends",
        ),
        _g("data", "annotations/*", {R, W}, "annotation revisions: new keys, never deleted"),
        _g("data", "predictions/*", {R}, "pre-annotations served to annotators"),
        _g(
            "data",
            "predictions/_sessions/*",
            {DV},
            "a MONAI Label session's masks: removed, every version, when it ends",
        ),
        _g("data", "*", {L}, "readiness (HeadBucket); its database holds every key anyway"),
    ),
    "inference": (
        _g("data", "volumes/*", {R}, "the CT it segments, and the kept model input"),
        _g("data", "volumes/*/model-input/*", {W}, "the model input kept beside the volume"),
        _g("data", "predictions/*", {W}, "masks and prediction.json"),
        _g("models", "{models}/*", {R, L}, "manifests (preprocessing, digests), versions"),
    ),
    "training": (
        _g("data", "volumes/*", {R}, "training images and public labels"),
        _g("data", "annotations/*", {R}, "corrected labels"),
        _g("data", "predictions/*", {R}, "the parent version's pre-annotations, for its Dice"),
        _g("data", "{jobs}/*", {R, W, D, L}, "a round run as a Kubernetes Job: in, out, clean"),
        _g("models", "{models}/*", {R, W, L}, "publishes candidate versions; fine-tunes"),
    ),
    "metrics": (
        _g("data", "volumes/*/label.nii.gz", {R}, "reference labels of evaluation volumes"),
        _g("data", "annotations/*", {R}, "corrections, for Dice"),
        _g("data", "predictions/*", {R}, "pre-annotations, for Dice"),
        _g("data", "metrics/*", {R, W, DV}, "its snapshot; replacing it drops its old version"),
        _g("data", "reports/*", {R, W, L}, "transfer-run reports"),
    ),
    "triton": (
        _g("models", "{models}/*", {R}, "loads model versions (model.py, weights)"),
        _g("models", "*", {L}, "the repository; its S3 client checks the bucket (HeadBucket)"),
    ),
}
IDENTITIES: tuple[str, ...] = tuple(GRANTS)

# Revisions nobody but root removes: an explicit Deny for every identity.
IMMUTABLE: tuple[tuple[Bucket, str], ...] = (("data", "annotations/*"), ("models", "{models}/*"))


def bucket_name(settings: Settings, bucket: Bucket) -> str:
    return settings.s3.bucket if bucket == "data" else settings.s3.model_bucket


def key_pattern(settings: Settings, keys: str) -> str:
    models = settings.triton.model_prefix.strip("/")
    jobs = settings.training.kubernetes.s3_prefix.strip("/")
    return keys.replace("{models}", models).replace("{jobs}", jobs)


# Keys no grant of some identity covers: what a check reads to see a refusal.
_PROBES: tuple[tuple[Bucket, str], ...] = (
    ("models", "{models}/ctloop-probe"),
    ("data", "volumes/ctloop-probe"),
    ("data", "annotations/ctloop-probe"),
    ("data", "ctloop-probe"),
)


def outside_read(settings: Settings, identity: str) -> tuple[str, str]:
    """(bucket, key) that ``identity`` may not read: no READ grant's pattern matches it."""
    from fnmatch import fnmatchcase

    for kind, keys in _PROBES:
        key = key_pattern(settings, keys)
        if not any(
            Verb.READ in g.verbs
            and g.bucket == kind
            and fnmatchcase(key, key_pattern(settings, g.keys))
            for g in GRANTS[identity]
        ):
            return bucket_name(settings, kind), key
    raise ValueError(f"identity {identity} may read every probe key")


def _arn(bucket: str, keys: str = "") -> str:
    return f"arn:aws:s3:::{bucket}/{keys}" if keys else f"arn:aws:s3:::{bucket}"


def statements(settings: Settings, identity: str) -> list[dict[str, Any]]:
    """The identity's policy statements (no Principal) over both buckets: Allow what
    :data:`GRANTS` says, Deny deleting what :data:`IMMUTABLE` names."""
    out: list[dict[str, Any]] = []
    for g in GRANTS[identity]:
        bucket, keys = bucket_name(settings, g.bucket), key_pattern(settings, g.keys)
        for verb in sorted(g.verbs & OBJECT_ACTIONS.keys()):  # one per verb: alike ones merge
            actions = list(OBJECT_ACTIONS[verb])
            out.append({"Effect": "Allow", "Action": actions, "Resource": [_arn(bucket, keys)]})
        if Verb.LIST in g.verbs:
            listing: dict[str, Any] = {
                "Effect": "Allow",
                "Action": ["s3:ListBucket"],
                "Resource": [_arn(bucket)],
            }
            if keys != "*":
                # "models/*" lists "models", "models/" and anything under it
                prefix = keys.removesuffix("*")
                allowed = sorted({prefix.rstrip("/"), prefix, f"{prefix}*"})
                listing["Condition"] = {"StringLike": {"s3:prefix": allowed}}
            out.append(listing)
    for bucket_kind, keys in IMMUTABLE:
        bucket = bucket_name(settings, bucket_kind)
        out.append(
            {
                "Effect": "Deny",
                "Action": ["s3:DeleteObject", "s3:DeleteObjectVersion"],
                "Resource": [_arn(bucket, key_pattern(settings, keys))],
            }
        )
    return out


def identity_policy(settings: Settings, identity: str) -> dict[str, Any]:
    """An IAM identity policy for ``identity`` (MinIO: ``mc admin policy create``)."""
    return {"Version": "2012-10-17", "Statement": statements(settings, identity)}


def bucket_policy(
    settings: Settings, bucket: Bucket, access_keys: dict[str, str]
) -> dict[str, Any]:
    """The bucket policy of ``bucket`` for every identity in ``access_keys`` (identity -> its
    access key, the principal Versity Gateway matches): each identity's statements on this
    bucket, with that principal."""
    name = bucket_name(settings, bucket)
    # Statements alike but for their principal are merged: the gateway keeps the policy in an
    # extended attribute of the bucket folder, which ext4 limits to about 4 KB.
    merged: dict[str, dict[str, Any]] = {}
    for identity, access in access_keys.items():
        for s in statements(settings, identity):
            if all(r.split(":::", 1)[1].split("/", 1)[0] == name for r in s["Resource"]):
                same = merged.setdefault(json.dumps(s, sort_keys=True), {**s, "Principal": []})
                same["Principal"].append(access)
    # ... and then those alike but for their resources.
    by_rest: dict[str, dict[str, Any]] = {}
    for s in merged.values():
        rest = json.dumps({k: v for k, v in s.items() if k != "Resource"}, sort_keys=True)
        same = by_rest.setdefault(rest, {**s, "Resource": []})
        same["Resource"].extend(s["Resource"])
    out = [{**s, "Principal": {"AWS": s["Principal"]}} for s in by_rest.values()]
    return {"Version": "2012-10-17", "Statement": out}


def policy_text(policy: dict[str, Any]) -> str:
    """``policy`` as the compact JSON a server stores."""
    return json.dumps(policy, separators=(",", ":"))


# ------------------------------------------------------------------ credentials


@dataclass(frozen=True)
class Credential:
    access_key: str
    secret_key: str

    def __repr__(self) -> str:  # never print the secret
        return f"Credential({self.access_key!r}, '**********')"


def access_key_of(identity: str) -> str:
    return f"ctloop-{identity}"


def new_credential(identity: str) -> Credential:
    return Credential(access_key_of(identity), secrets.token_urlsafe(30))


def credential_file(directory: Path, identity: str) -> Path:
    return directory / f"{identity}.json"


def read_credential(path: Path) -> Credential | None:
    """The credential in ``path``, or None if there is no such file."""
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    return Credential(str(raw["access_key"]), str(raw["secret_key"]))


def write_credential(path: Path, credential: Credential) -> None:
    """Write ``credential`` readable by this user only (0600 from the start: the file is created
    with that mode, then renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"access_key": credential.access_key, "secret_key": credential.secret_key}, f)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m ctloop.s3_grants [IDENTITY]``: the IAM identity policy of each identity (or
    one), as JSON, for a storage team that creates the users itself (the chart's
    ``objectStore.identities.provision: false``)."""
    import argparse

    from ctloop.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m ctloop.s3_grants", description=main.__doc__)
    parser.add_argument("identity", nargs="?", choices=IDENTITIES, help="default: every one")
    args = parser.parse_args(argv)
    settings = Settings()
    wanted = [args.identity] if args.identity else list(IDENTITIES)
    out = {
        i: {"access_key": access_key_of(i), "policy": identity_policy(settings, i)} for i in wanted
    }
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

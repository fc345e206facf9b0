"""5. Ingest: upload throughput through the REST API (a labelled CT: volume and label as
gzipped NIfTI, validated in full, stored, recorded and announced) against a direct ``minio``
put of the same bytes into the same S3 gateway."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from bench.common import Context, Preset, median, result, rotated
from bench.platform import Platform
from bench.session import SITE, Session
from bench.workload import CT, phantom_ct
from ctloop.contracts import keys
from ctloop.core.blobs import STORED_CT_DTYPES, STORED_LABEL_DTYPES, encode_ct, nifti_gz_bytes
from ctloop.core.organs import LabelMap
from ctloop.storage import ObjectStore
from services.ingest.validation import Limits, read_nifti_upload, validate_ct, validate_mask

NAME = "5_ingest"


def run(ctx: Context, session: Session) -> dict[str, Any]:
    preset = ctx.preset
    sides = _Sides(session.platform(), phantom_ct(preset.volume_size, seed=2))
    sides.platform_side(-1)  # warm-up
    sides.baseline(-1)
    sides.in_process(-1)
    sides.phases.clear()
    ours, theirs, script = rotated(
        preset.ingest_repeats, sides.platform_side, sides.baseline, sides.in_process
    )
    sides.remove_written()
    return _result(preset, sides, ours, theirs, script)


class _Sides:
    """The upload through the API, the direct put of the same bytes, and the same checks and
    writes in a script; each in MB/s of the CT + label. Keeps the service's Server-Timing laps
    and the keys the other two wrote (they are not the platform's data)."""

    def __init__(self, p: Platform, ct: CT) -> None:
        self.p, self.ct = p, ct
        self.label = nifti_gz_bytes(ct.label, ct.affine)
        self.size_mb = (len(ct.nifti_gz) + len(self.label)) / 1e6
        self.store = ObjectStore(p.settings)
        self.bucket = p.settings.s3.bucket
        self.written: list[tuple[str, str | None]] = []
        self.phases: dict[str, list[float]] = defaultdict(list)  # Server-Timing laps, ms
        self.limits = Limits(max_bytes=1 << 40, max_voxels=1 << 40)

    def platform_side(self, i: int) -> float:
        files = {
            "file": ("ct.nii.gz", self.ct.nifti_gz, "application/gzip"),
            "label": ("label.nii.gz", self.label, "application/gzip"),
        }
        data = {"site_id": SITE, "dataset": "public", "volume_id": f"b5-{self.p.tag}-{i}"}
        t0 = time.perf_counter()
        status, headers, body = self.p.upload(files, data)
        seconds = time.perf_counter() - t0
        if status != 201:
            raise RuntimeError(f"upload refused: {status} {body}")
        laps = _server_timing(headers.get("server-timing", headers.get("Server-Timing", "")))
        for k, v in laps.items():
            self.phases[k].append(v)
        self.phases["http"].append(seconds * 1000 - sum(laps.values()))
        return self.size_mb / seconds

    def baseline(self, i: int) -> float:
        t0 = time.perf_counter()
        self._put(f"b5-{i}", self.ct.nifti_gz, self.label)
        return self.size_mb / (time.perf_counter() - t0)

    def in_process(self, i: int) -> float:
        """The same checks and writes in a script: the floor for any ingest that looks at
        every voxel before it accepts a volume."""
        ct, label, limits = self.ct, self.label, self.limits
        t0 = time.perf_counter()
        up = read_nifti_upload(ct.nifti_gz, limits, dtypes=STORED_CT_DTYPES)
        image = validate_ct(up.array, up.grid)
        blob = ct.nifti_gz if up.storable else encode_ct(image, up.grid.affine)
        lab = read_nifti_upload(label, limits, "label", STORED_LABEL_DTYPES)
        mask = validate_mask(lab.array, lab.grid, up.grid, LabelMap.canonical())
        mask_blob = label if lab.storable else nifti_gz_bytes(mask, up.grid.affine)
        self._put(f"b5-script-{i}", blob, mask_blob)
        return self.size_mb / (time.perf_counter() - t0)

    def _put(self, name: str, image: bytes, label: bytes) -> None:
        """Image and label straight into the bucket, remembered for :meth:`remove_written`."""
        for part, blob in (("image", image), ("label", label)):
            key = keys.bench_blob(self.p.tag, name, part)
            obj = self.store.put_bytes(self.bucket, key, blob, "application/gzip")
            self.written.append((key, obj.version_id))

    def remove_written(self) -> None:
        for key, version in self.written:
            self.store.client.remove_object(self.bucket, key, version_id=version)


def _result(
    preset: Preset, sides: _Sides, ours: list[float], theirs: list[float], script: list[float]
) -> dict[str, Any]:
    ratio = median(ours) / median(theirs)
    split = {k: round(median(v), 1) for k, v in sides.phases.items()}
    vs_script = median(ours) / median(script)
    return result(
        NAME,
        "Ingest",
        "upload throughput (CT + label)",
        "MB/s",
        ours,
        theirs,
        {
            "volume_shape": list(sides.ct.image.shape),
            "upload_mb": round(sides.size_mb, 2),
            "phantom_size": preset.volume_size,
            "repeats": preset.ingest_repeats,
            "what_ingest_does": "reads, decompresses and validates both files, stores both in "
            "S3, commits the volume row with its outbox event",
        },
        baseline_name="direct minio put",
        higher_is_better=True,
        target="≥ 0.8",
        target_met=ratio >= 0.8,
        details={
            "server_timing_ms": split,
            "in_process_mb_s": median(script),
            "in_process_samples": script,
            "ratio_vs_in_process": vs_script,
            "note": f"{vs_script:.2f}x the same checks and writes in a script "
            f"({median(script):.1f} MB/s); median split (ms): "
            + ", ".join(f"{k} {v}" for k, v in split.items()),
        },
    )


def _server_timing(header: str) -> dict[str, float]:
    """``decode;dur=12.5, store;dur=3`` -> {"decode": 12.5, "store": 3.0}."""
    laps = {}
    for part in filter(None, (p.strip() for p in header.split(","))):
        name, _, rest = part.partition(";dur=")
        if rest:
            laps[name] = float(rest)
    return laps

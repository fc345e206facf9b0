"""What the web viewer needs besides HTTP: how each view lays a volume on the screen, the decoded
volumes it slices (cached), how often slice reads are audited, and the page's security headers."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from urllib.parse import urlsplit

import nibabel as nib
import numpy as np
from numpy.typing import NDArray

from ctloop.core.blobs import nifti_from_gz
from ctloop.storage import ObjectStore
from services.ingest.schemas import ViewOut

# Decoded volumes kept in this process for slicing: a 512x512x300 int16 CT is 150 MB.
VOLUME_CACHE_BYTES = 1 << 30
# Scrolling reads hundreds of planes; one audit entry per user and volume per period says it.
SLICE_AUDIT_PERIOD_S = 600.0
# Overlay colours (RGB), one per canonical organ id; index 0 (background) is never drawn.
ORGAN_COLOURS: dict[str, str] = {
    "liver": "#d2553c",
    "spleen": "#8e5ec8",
    "kidney_right": "#e8c547",
    "kidney_left": "#c9a227",
    "stomach": "#4aa3df",
    "pancreas": "#f08fc0",
    "gallbladder": "#4cbf73",
    "aorta": "#e23b3b",
    "ivc": "#3b6fe2",
}


def page_headers(oidc_issuer: str | None) -> dict[str, str]:
    """The page loads nothing from elsewhere and runs no inline script; it talks to ctloop and,
    with OIDC sign-in, to the issuer (discovery, token and refresh requests)."""
    connect = "'self'"
    if oidc_issuer:
        origin = urlsplit(oidc_issuer)
        connect += f" {origin.scheme}://{origin.netloc}"
    return {
        "Content-Security-Policy": (
            f"default-src 'self'; img-src 'self' data: blob:; connect-src {connect}; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        ),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


def display_views(affine: NDArray[np.float64], shape: tuple[int, int, int]) -> dict[str, ViewOut]:
    """Axial, coronal and sagittal views in the radiological convention: the patient's right on
    the screen's left, anterior (axial) or superior (coronal, sagittal) at the top, anterior on
    the left of the sagittal view. Works for any axis order the volume was stored in."""
    codes = nib.aff2axcodes(affine)
    axis: dict[str, int] = {}
    towards: dict[str, bool] = {}  # index grows towards R / A / S
    for ax, code in enumerate(codes):
        world = {"R": "x", "L": "x", "A": "y", "P": "y", "S": "z", "I": "z"}[str(code)]
        axis[world], towards[world] = ax, code in ("R", "A", "S")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    layout = {  # view: (slice, rows, cols); a row or column is reversed when its index grows
        "axial": ("z", "y", "x"),  # towards what the screen shows at its top / left
        "coronal": ("y", "z", "x"),
        "sagittal": ("x", "z", "y"),
    }
    views = {}
    for name, (s, r, c) in layout.items():
        views[name] = ViewOut(
            axis=axis[s],
            rows=axis[r],
            cols=axis[c],
            flip_rows=towards[r],
            flip_cols=towards[c],
            row_mm=float(spacing[axis[r]]),
            col_mm=float(spacing[axis[c]]),
            size=shape[axis[s]],
        )
    return views


class VolumeCache:
    """Decoded volumes (int16) by S3 key and version, least recently used dropped first."""

    def __init__(self, budget_bytes: int = VOLUME_CACHE_BYTES) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[tuple[str, str | None], NDArray[np.int16]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, store: ObjectStore, bucket: str, key: str, version: str | None
    ) -> NDArray[np.int16]:
        with self._lock:
            hit = self._items.get((key, version))
            if hit is not None:
                self._items.move_to_end((key, version))
                return hit
        raw = store.get_bytes(bucket, key, version)
        data = np.asarray(nifti_from_gz(raw).dataobj)
        if data.dtype != np.int16:
            data = np.clip(np.rint(data), -32768, 32767).astype(np.int16)
        with self._lock:
            self._items[(key, version)] = data
            while len(self._items) > 1 and sum(a.nbytes for a in self._items.values()) > (
                self.budget
            ):
                self._items.popitem(last=False)
        return data


class SliceReads:
    """Whether a user's slice read of a volume is due an audit entry (once per period)."""

    def __init__(self, period_s: float = SLICE_AUDIT_PERIOD_S) -> None:
        self.period_s = period_s
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def due(self, user_id: str, volume_id: str) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get((user_id, volume_id), -1e9) <= self.period_s:
                return False
            self._last[(user_id, volume_id)] = now
            return True

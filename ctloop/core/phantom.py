"""Synthetic abdominal CT phantoms with site-specific domain shift.

No CT data can be downloaded where ctloop is built, so tests, the demo and the benchmarks use
phantoms: seeded, labelled volumes with body outline, subcutaneous and visceral fat, muscle,
spine and ribs, liver, spleen, kidneys, stomach (with air), pancreas, gallbladder, aorta and IVC
at realistic Hounsfield units, with anatomical variation (size, position, smooth shape
deformation). A :class:`SiteProfile` shifts the domain the way scanners and protocols do:
contrast phase (per-organ HU), calibration (scale/offset), noise, blur, slice spacing, field of
view and patient size.

Anatomy is described in patient millimetres with +x towards the patient's left, +y anterior,
+z cranial, and sampled on a RAS+ grid (the volume's affine), one slab of slices at a time to
bound memory: the liver lies on the patient's right as it should. Arrays are ``(x, y, z)`` as in
NIfTI.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from ctloop.core.organs import ORGAN_IDS

# The site profiles live in site_profiles; importers of the phantom keep finding them here.
from ctloop.core.site_profiles import (
    FIXED_HU,
    PHASE_HU,
    SITES,
    TISSUES,
    InvalidSiteProfile,
    Phase,
    SiteError,
    SiteProfile,
    UnknownSite,
    load_site,
)

__all__ = [  # with the site profiles' names, which importers of the phantom use
    "FIXED_HU", "PHASE_HU", "SITES", "SIZES", "TISSUES", "InvalidSiteProfile", "Phantom",
    "Phase", "SiteError", "SiteProfile", "UnknownSite", "generate_phantom", "load_site",
]  # fmt: skip

# Grid sizes: in-plane matrix and the thinnest slice spacing allowed at that size.
SIZES: dict[str, tuple[int, float]] = {
    "tiny": (48, 8.0),
    "small": (96, 4.0),
    "medium": (192, 2.5),
    "full": (512, 0.0),
}


@dataclass
class Phantom:
    image: NDArray[np.int16]  # HU, (x, y, z)
    label: NDArray[np.uint8]  # canonical organ ids, same grid
    spacing: tuple[float, float, float]  # mm
    site: str
    seed: int

    @property
    def affine(self) -> NDArray[np.float64]:
        """Voxel -> patient mm, centred on the volume (RAS)."""
        aff = np.diag([*self.spacing, 1.0])
        aff[:3, 3] = -(np.array(self.image.shape) - 1) / 2 * np.array(self.spacing)
        return aff


# ---------------------------------------------------------------- anatomy
@dataclass(frozen=True)
class Ellipsoid:
    center: tuple[float, float, float]
    axes: tuple[float, float, float]
    angle_deg: float = 0.0  # rotation about z

    def value(self, x: NDArray, y: NDArray, z: NDArray) -> NDArray:
        """< 1 inside."""
        cx, cy, cz = self.center
        dx, dy = x - cx, y - cy
        if self.angle_deg:
            t = np.deg2rad(self.angle_deg)
            dx, dy = np.cos(t) * dx + np.sin(t) * dy, -np.sin(t) * dx + np.cos(t) * dy
        ax, ay, az = self.axes
        return (dx / ax) ** 2 + (dy / ay) ** 2 + ((z - cz) / az) ** 2


@dataclass(frozen=True)
class Anatomy:
    """One patient's geometry, drawn from the seed."""

    body: tuple[float, float]  # semi-axes of the body ellipse (mm)
    fat: float  # subcutaneous fat thickness
    muscle: float  # abdominal wall muscle thickness
    organs: dict[str, Ellipsoid]
    liver_cut: float  # the left lobe ends at this x
    stomach_air: float  # fraction of the stomach (anterior, top) filled with air
    aorta: tuple[float, float, float]  # x, y, radius
    ivc: tuple[float, float, float]
    ivc_top: float
    spine_y: float
    warp: NDArray[np.float32]  # coarse displacement field (3, n, n, n) in mm
    warp_extent: float


def _draw_anatomy(rng: np.random.Generator, scale: float) -> Anatomy:
    def j(sd: float) -> float:
        return float(rng.normal(0.0, sd))

    def s(lo: float = 0.88, hi: float = 1.12) -> float:
        return float(rng.uniform(lo, hi)) * scale

    body = (
        150.0 * scale * float(rng.uniform(0.95, 1.05)),
        105.0 * scale * float(rng.uniform(0.93, 1.07)),
    )
    k = s()
    organs = {
        "liver": Ellipsoid((-55 * scale + j(6), 5 + j(5), 55 + j(8)), (95 * k, 75 * k, 75 * k), j(8)),
        "spleen": Ellipsoid((88 * scale + j(5), -30 + j(5), 65 + j(8)), (28 * s(), 48 * s(), 50 * s()), 30 + j(8)),
        "kidney_right": Ellipsoid((-70 * scale + j(4), -48 * scale + j(4), -5 + j(8)), (25 * s(), 30 * s(), 55 * s()), -20 + j(6)),
        "kidney_left": Ellipsoid((72 * scale + j(4), -48 * scale + j(4), 10 + j(8)), (25 * s(), 30 * s(), 55 * s()), 20 + j(6)),
        "stomach": Ellipsoid((45 * scale + j(6), 35 * scale + j(5), 75 + j(8)), (48 * s(), 32 * s(), 50 * s()), 25 + j(10)),
        "pancreas": Ellipsoid((15 * scale + j(5), 0 + j(4), 25 + j(6)), (70 * s(), 11 * s(), 14 * s()), -12 + j(6)),
        "gallbladder": Ellipsoid((-48 * scale + j(4), 40 * scale + j(4), 22 + j(6)), (15 * s(), 15 * s(), 30 * s()), j(10)),
    }  # fmt: skip
    n = 5
    warp = rng.normal(0.0, 6.0, size=(3, n, n, n)).astype(np.float32)
    return Anatomy(
        body=body,
        fat=float(rng.uniform(12, 32)) * scale,
        muscle=float(rng.uniform(8, 14)),
        organs=organs,
        liver_cut=30.0 * scale + j(8),
        stomach_air=float(rng.uniform(0.15, 0.4)),
        aorta=(18 * scale + j(3), -32 * scale + j(3), float(rng.uniform(9, 13))),
        ivc=(-22 * scale + j(3), -26 * scale + j(3), float(rng.uniform(10, 14))),
        ivc_top=95.0 + j(8),
        spine_y=-62.0 * scale + j(3),
        warp=warp,
        warp_extent=max(body) * 1.2,
    )


# ---------------------------------------------------------------- sampling
def generate_phantom(
    site: SiteProfile | str,
    seed: int,
    size: str = "small",
    slab: int = 24,
) -> Phantom:
    """One labelled CT of ``site``; the same (site, seed, size) always gives the same volume."""
    profile = load_site(site) if isinstance(site, str) else site
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(SIZES)}")
    matrix, min_slice = SIZES[size]
    rng = np.random.default_rng([seed, _stable_hash(profile.name)])
    scale = float(rng.uniform(*profile.patient_scale))
    anatomy = _draw_anatomy(rng, scale)
    fov = float(rng.uniform(*profile.fov_mm))
    # Patients bigger than the field of view are cut at its edge, as in real scans.
    inplane = fov / matrix
    dz = max(profile.slice_spacing_mm, min_slice)
    z_extent = float(rng.uniform(*profile.z_extent_mm))
    nz = max(8, round(z_extent / dz))
    spacing = (inplane, inplane, dz)
    xs = (np.arange(matrix) - (matrix - 1) / 2) * inplane
    zs = (np.arange(nz) - (nz - 1) / 2) * dz + float(rng.normal(20.0, 10.0))
    hu = {**PHASE_HU[profile.phase], **FIXED_HU}
    for tissue, delta in profile.hu_offsets.items():
        hu[tissue] = hu.get(tissue, 0.0) + delta

    image = np.empty((matrix, matrix, nz), dtype=np.float32)
    label = np.zeros((matrix, matrix, nz), dtype=np.uint8)
    texture = _smooth_noise(rng, (matrix, matrix, nz), cells=6)
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        # RAS +x is the patient's right: the anatomy's +x (patient left) is -x here.
        axes = (-xs, xs, zs[z0:z1])
        x, y, z = _warp(anatomy, *axes)
        img, lab = _paint(anatomy, hu, x, y, z, axes)
        image[:, :, z0:z1] = img
        label[:, :, z0:z1] = lab
    image += texture * profile.texture_hu * (label > 0)
    sigma = (profile.blur_mm / inplane, profile.blur_mm / inplane, profile.blur_mm / dz)
    image = ndimage.gaussian_filter(image, sigma=sigma, mode="nearest")
    image += rng.normal(0.0, profile.noise_hu, size=image.shape).astype(np.float32)
    image = image * profile.intensity_scale + profile.intensity_offset
    out = np.clip(np.rint(image), -1024, 3071).astype(np.int16)
    return Phantom(image=out, label=label, spacing=spacing, site=profile.name, seed=seed)


def _stable_hash(text: str) -> int:
    """64 bits of the SHA-256 of the whole text: every site name seeds its own patients."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], cells: int) -> NDArray:
    coarse = rng.normal(0.0, 1.0, size=(cells, cells, cells)).astype(np.float32)
    zoom = [s / cells for s in shape]
    smooth = ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
    return smooth[: shape[0], : shape[1], : shape[2]]


def _warp(a: Anatomy, ux: NDArray, uy: NDArray, uz: NDArray) -> tuple[NDArray, NDArray, NDArray]:
    """Points of the grid ``ux x uy x uz`` moved by the patient's smooth random displacement.

    The field is smooth over tens of mm, so it is sampled every 4th voxel in-plane and
    interpolated linearly in between.
    """
    n = a.warp.shape[1]
    to_grid = (n - 1) / (2 * a.warp_extent)
    step = 4
    cx, cy = ux[::step], uy[::step]
    gx, gy, gz = np.meshgrid(cx, cy, uz, indexing="ij")
    coords = np.stack([(c + a.warp_extent) * to_grid for c in (gx, gy, gz)]).reshape(3, -1)
    shape = (len(ux), len(uy), len(uz))
    x, y, z = np.meshgrid(ux, uy, uz, indexing="ij")
    moved = []
    for i, base in enumerate((x, y, z)):
        coarse = ndimage.map_coordinates(a.warp[i], coords, order=1, mode="nearest")
        coarse = coarse.reshape(gx.shape).astype(np.float32)
        zoom = [s / c for s, c in zip(shape, coarse.shape, strict=True)]
        fine = ndimage.zoom(coarse, zoom, order=1, mode="nearest", grid_mode=True)
        moved.append(base + fine[: shape[0], : shape[1], : shape[2]])
    return moved[0], moved[1], moved[2]


def _span(u: NDArray, center: float, half: float) -> slice:
    """Index range of the monotonic coordinate vector ``u`` within ``center ± half``."""
    idx = np.nonzero(np.abs(u - center) <= half)[0]
    return slice(int(idx[0]), int(idx[-1]) + 1) if idx.size else slice(0, 0)


def _paint(
    a: Anatomy,
    hu: dict[str, float],
    x: NDArray,
    y: NDArray,
    z: NDArray,
    axes: tuple[NDArray, NDArray, NDArray],
) -> tuple[NDArray, NDArray]:
    """Tissue HU and organ labels at the (warped) points; ``axes`` are the unwarped 1-D grid
    coordinates, used to bound where each organ can be.

    Layers are painted outside in, each over the last: trunk, musculoskeletal, organs.
    """
    img = np.full(x.shape, hu["air"], dtype=np.float32)
    lab = np.zeros(x.shape, dtype=np.uint8)
    inner, r_body = _paint_trunk(a, hu, x, y, z, img)
    _paint_musculoskeletal(a, hu, x, y, z, img, inner, r_body)
    _paint_organs(a, hu, x, y, z, axes, img, lab, inner)
    return img, lab


def _paint_trunk(
    a: Anatomy, hu: dict[str, float], x: NDArray, y: NDArray, z: NDArray, img: NDArray
) -> tuple[NDArray, NDArray]:
    """Body outline, subcutaneous and visceral fat and the abdominal wall into ``img``.

    Returns the inside of the subcutaneous fat (where everything else may go) and the body's
    normalised radius (the ribs follow it).
    """
    bx, by = a.body
    # Body tapers slightly towards the pelvis and the chest.
    taper = 1.0 - 0.0000025 * (z - 30.0) ** 2
    r_body = (x / (bx * taper)) ** 2 + (y / (by * taper)) ** 2
    body = r_body < 1.0
    img[body] = hu["fat"]
    inner = (x / (bx * taper - a.fat)) ** 2 + (y / (by * taper - a.fat)) ** 2 < 1.0
    wall = inner & ~(
        (x / (bx * taper - a.fat - a.muscle)) ** 2 + (y / (by * taper - a.fat - a.muscle)) ** 2
        < 1.0
    )
    img[inner] = hu["visceral_fat"]
    img[wall] = hu["muscle"]
    return inner, r_body


def _paint_musculoskeletal(
    a: Anatomy,
    hu: dict[str, float],
    x: NDArray,
    y: NDArray,
    z: NDArray,
    img: NDArray,
    inner: NDArray,
    r_body: NDArray,
) -> None:
    """Paraspinal and psoas muscles, the spine and the ribs into ``img`` (no labels)."""
    for sx in (-1, 1):
        para = ((x - sx * 38) / 28) ** 2 + ((y - a.spine_y + 15) / 22) ** 2 < 1.0
        psoas = ((x - sx * 35) / 16) ** 2 + ((y - a.spine_y - 22) / 16) ** 2 < 1.0
        img[inner & (para | (psoas & (z < 40)))] = hu["muscle"]
    # Spine: vertebral bodies separated by discs, cortical rim, spinal canal.
    vb = (x / 22) ** 2 + ((y - a.spine_y) / 18) ** 2
    disc = np.mod(z, 32.0) < 6.0
    img[(vb < 1.0) & ~disc] = hu["bone"]
    img[(vb < 0.6) & ~disc] = hu["marrow"]
    img[(vb < 1.0) & disc] = hu["muscle"] + 20
    canal = (x / 9) ** 2 + ((y - a.spine_y + 28) / 9) ** 2 < 1.0
    post = (x / 18) ** 2 + ((y - a.spine_y + 30) / 16) ** 2 < 1.0
    img[post & ~canal & ~disc] = hu["bone"]
    # Ribs: thin arcs inside the wall, every ~30 mm, in the upper abdomen.
    rib_ring = np.abs(r_body - 0.80) < 0.035
    ribs = rib_ring & (np.mod(z + 8.0, 30.0) < 9.0) & (z > 40.0) & (y > a.spine_y)
    img[ribs] = hu["bone"]


def _paint_organs(
    a: Anatomy,
    hu: dict[str, float],
    x: NDArray,
    y: NDArray,
    z: NDArray,
    axes: tuple[NDArray, NDArray, NDArray],
    img: NDArray,
    lab: NDArray,
    inner: NDArray,
) -> None:
    """Organs and vessels into ``img`` and ``lab``, only inside ``inner``.

    Each organ is evaluated only inside its bounding box (plus the largest displacement).
    """
    margin = float(np.abs(a.warp).max()) + 2.0
    ux, uy, uz = axes

    def box(center: tuple[float, ...], half: tuple[float, ...]) -> tuple[slice, ...]:
        return tuple(
            _span(u, c, h + margin) for u, c, h in zip((ux, uy, uz), center, half, strict=True)
        )

    def put(b: tuple[slice, ...], mask: NDArray, tissue: str, organ: str | None) -> None:
        mask = mask & inner[b]
        img[b][mask] = hu[tissue]
        if organ is not None:
            lab[b][mask] = ORGAN_IDS[organ]

    def ellipsoid(name: str, level: float = 1.0) -> tuple[tuple[slice, ...], NDArray]:
        e = a.organs[name]
        r = max(e.axes[0], e.axes[1])
        b = box(e.center, (r, r, e.axes[2]))
        return b, e.value(x[b], y[b], z[b]) < level

    b, m = ellipsoid("liver")
    put(b, m & (x[b] < a.liver_cut), "liver", "liver")
    put(*ellipsoid("spleen"), "spleen", "spleen")
    for side in ("kidney_right", "kidney_left"):
        put(*ellipsoid(side), "kidney", side)
    put(*ellipsoid("stomach"), "stomach", "stomach")
    st = a.organs["stomach"]
    b, lumen = ellipsoid("stomach", 0.55)
    lumen &= inner[b]
    air = y[b] > st.center[1] + st.axes[1] * (1.0 - 2.0 * a.stomach_air)
    img[b][lumen & air] = hu["gastric_air"]
    img[b][lumen & ~air] = hu["gastric_fluid"]
    put(*ellipsoid("pancreas"), "pancreas", "pancreas")
    put(*ellipsoid("gallbladder"), "gallbladder", "gallbladder")
    ax_, ay_, ar = a.aorta
    b = box((ax_, ay_, 0.0), (ar, ar, 1e6))
    put(b, (x[b] - ax_) ** 2 + (y[b] - ay_) ** 2 < ar**2, "aorta", "aorta")
    ix, iy, ir = a.ivc
    b = box((ix, iy, 0.0), (ir, ir, 1e6))
    ivc = ((x[b] - ix) ** 2 + ((y[b] - iy) * 1.3) ** 2 < ir**2) & (z[b] < a.ivc_top)
    put(b, ivc, "ivc", "ivc")

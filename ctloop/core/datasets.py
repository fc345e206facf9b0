"""Datasets on disk: NIfTI image/label pairs, Decathlon ``dataset.json``, DICOM series.

Every dataset carries its own label map; loading maps labels to canonical organ ids.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from nibabel import orientations
from nibabel.spatialimages import SpatialImage
from numpy.typing import NDArray

from ctloop.core.organs import ORGAN_IDS, LabelMap
from ctloop.core.phantom import Phantom, SiteProfile, generate_phantom, load_site


class DatasetError(ValueError):
    """A dataset that cannot be read as declared; the message names the file and the problem."""


@dataclass
class Volume:
    """An image (HU, ``(x, y, z)``), its optional canonical label and its geometry."""

    id: str
    image: NDArray[np.float32]
    affine: NDArray[np.float64]
    label: NDArray[np.uint8] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> tuple[float, float, float]:
        sx, sy, sz = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return float(sx), float(sy), float(sz)

    def as_ras(self) -> Volume:
        """The same volume with its axes flipped/permuted to RAS+ (what the phantoms use)."""
        ornt = orientations.io_orientation(self.affine)
        to_ras = orientations.inv_ornt_aff(ornt, self.image.shape)

        def apply(a: NDArray | None) -> NDArray | None:
            return None if a is None else orientations.apply_orientation(a, ornt)

        return Volume(
            id=self.id,
            image=np.ascontiguousarray(apply(self.image)),
            affine=self.affine @ to_ras,
            label=apply(self.label),
            meta=dict(self.meta),
        )


# ---------------------------------------------------------------- NIfTI
def save_nifti(path: Path, array: NDArray, affine: NDArray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    if array.dtype == np.uint8:
        img.header.set_intent("label")
    nib.save(img, str(path))


def load_nifti(path: Path) -> tuple[NDArray, NDArray[np.float64]]:
    try:
        img = cast(SpatialImage, nib.load(str(path)))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise DatasetError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if data.ndim != 3:
        raise DatasetError(f"{path}: expected a 3-D volume, got shape {data.shape}")
    return data, np.asarray(img.affine, dtype=np.float64)


def phantom_volume(p: Phantom, volume_id: str) -> Volume:
    return Volume(
        id=volume_id,
        image=p.image.astype(np.float32),
        affine=p.affine,
        label=p.label,
        meta={"site": p.site, "seed": p.seed},
    )


# ---------------------------------------------------------------- Decathlon folders
@dataclass
class DecathlonDataset:
    """A folder with ``dataset.json``, ``imagesTr/`` and (for labelled sets) ``labelsTr/``."""

    root: Path
    name: str
    label_map: LabelMap
    training: list[dict[str, str]]  # {"image": rel, "label": rel}; label may be absent
    test: list[str]
    meta: dict[str, Any]

    @classmethod
    def open(cls, root: Path) -> DecathlonDataset:
        spec_path = root / "dataset.json"
        try:
            spec = json.loads(spec_path.read_text())
        except FileNotFoundError as exc:
            raise DatasetError(f"{root}: no dataset.json") from exc
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{spec_path}: invalid JSON ({exc})") from exc
        if "labels" not in spec or "training" not in spec:
            raise DatasetError(f"{spec_path}: needs 'labels' and 'training'")
        training = [
            {k: v for k, v in item.items() if k in ("image", "label")}
            if isinstance(item, dict)
            else {"image": str(item)}
            for item in spec["training"]
        ]
        return cls(
            root=root,
            name=str(spec.get("name", root.name)),
            label_map=LabelMap.from_decathlon(spec["labels"]),
            training=training,
            test=[str(t) for t in spec.get("test", [])],
            meta={k: v for k, v in spec.items() if k not in ("training", "test", "labels")},
        )

    def __len__(self) -> int:
        return len(self.training)

    def ids(self) -> list[str]:
        return [_volume_id(item["image"]) for item in self.training]

    def load(self, index: int) -> Volume:
        item = self.training[index]
        image, affine = load_nifti(self.root / item["image"])
        label = None
        if "label" in item:
            raw, label_affine = load_nifti(self.root / item["label"])
            if raw.shape != image.shape or not np.allclose(label_affine, affine, atol=1e-3):
                raise DatasetError(f"{item['label']}: label grid differs from its image's")
            if not np.issubdtype(raw.dtype, np.integer) and not np.all(np.mod(raw, 1) == 0):
                raise DatasetError(f"{item['label']}: label holds non-integer values")
            label = self.label_map.to_canonical(raw.astype(np.int64))
        return Volume(
            id=_volume_id(item["image"]),
            image=image.astype(np.float32),
            affine=affine,
            label=label,
            meta={"dataset": self.name},
        )

    def __iter__(self) -> Iterator[Volume]:
        for i in range(len(self)):
            yield self.load(i)


def _volume_id(rel: str) -> str:
    name = Path(rel).name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def write_decathlon(
    root: Path,
    volumes: Sequence[Volume],
    name: str,
    label_map: LabelMap | None = None,
    description: str = "",
    with_labels: bool = True,
) -> DecathlonDataset:
    """Write ``volumes`` as a Decathlon folder (labels in ``label_map``'s ids)."""
    label_map = label_map or LabelMap.canonical()
    to_dataset = np.zeros(len(ORGAN_IDS), dtype=np.uint8)  # canonical id -> dataset id
    for organ, value in label_map.organ_to_id.items():
        to_dataset[ORGAN_IDS[organ]] = value
    training = []
    for v in volumes:
        entry = {"image": f"./imagesTr/{v.id}.nii.gz"}
        save_nifti(root / entry["image"], v.image.astype(np.int16), v.affine)
        if with_labels and v.label is not None:
            entry["label"] = f"./labelsTr/{v.id}.nii.gz"
            save_nifti(root / entry["label"], to_dataset[v.label], v.affine)
        training.append(entry)
    spec = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": label_map.to_decathlon(),
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    root.mkdir(parents=True, exist_ok=True)  # an empty dataset (e.g. no held-out volume) too
    (root / "dataset.json").write_text(json.dumps(spec, indent=2))
    return DecathlonDataset.open(root)


def synthesize_dataset(
    root: Path,
    site: SiteProfile | str,
    count: int,
    seed: int,
    size: str = "small",
    label_map: LabelMap | None = None,
    with_labels: bool = True,
) -> DecathlonDataset:
    """``count`` phantoms of ``site`` written as a Decathlon folder (what ``ctloop synth`` does)."""
    profile = load_site(site) if isinstance(site, str) else site
    volumes = [
        phantom_volume(generate_phantom(profile, seed + i, size), f"{profile.name}_{seed + i:05d}")
        for i in range(count)
    ]
    return write_decathlon(
        root,
        volumes,
        name=f"ctloop-synth-{profile.name}",
        label_map=label_map,
        description=f"{profile.description} (synthetic phantoms, size {size}, seed {seed})",
        with_labels=with_labels,
    )


# ---------------------------------------------------------------- DICOM
def load_dicom_series(files: Sequence[Path]) -> Volume:
    """A CT series as a volume in HU with a RAS affine: one file per slice, or one enhanced
    multi-frame CT. Read through highdicom's volume API, which refuses what is not one regular
    volume (a missing or duplicated slice, uneven spacing, mixed orientation or pixel spacing,
    slices off the stack's normal) and applies each slice's own rescale. Also refused: files of
    several series, a modality other than CT, burned-in annotation (text in the pixels: PHI that
    no header rule removes). Every refusal is a :class:`DatasetError` saying why."""
    import pydicom

    if not files:
        raise DatasetError("empty DICOM series")
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            datasets = [pydicom.dcmread(str(f)) for f in files]
    except Exception as exc:
        raise DatasetError(f"not a readable DICOM file ({exc})") from exc
    if any("End of file reached" in str(w.message) for w in seen):
        raise DatasetError("a DICOM file is truncated (it ends inside its data)")
    if any("PixelData" not in ds for ds in datasets):
        raise DatasetError("a DICOM file has no pixel data (truncated, or not an image)")
    from ctloop.core.dicom_source import source_of

    for ds in datasets:  # some exports blank these in the dataset and keep them in the meta
        _from_file_meta(ds, "SOPClassUID", "MediaStorageSOPClassUID")
        _from_file_meta(ds, "SOPInstanceUID", "MediaStorageSOPInstanceUID")
    uid = _one_ct_series(datasets)
    hd = _highdicom_volume(datasets)
    nifti = hd.to_nibabel()
    source = source_of(datasets)  # the original series' UIDs and geometry (for its SEGs)
    return Volume(
        id=uid,
        image=np.asarray(nifti.dataobj, dtype=np.float32),
        affine=np.asarray(nifti.affine, dtype=np.float64),
        meta={
            "modality": "CT",
            "source_series": source.model_dump(mode="json") if source is not None else None,
        },
    )


def _from_file_meta(ds: Any, keyword: str, meta_keyword: str) -> None:
    """An empty or missing SOP class or instance UID taken from the file's own meta header
    (the same value by the standard; anonymisers that blank one often keep the other)."""
    if str(ds.get(keyword, "") or ""):
        return
    meta = getattr(ds, "file_meta", None)
    value = str(meta.get(meta_keyword, "") or "") if meta is not None else ""
    if value:
        setattr(ds, keyword, value)


def _one_ct_series(datasets: Sequence[Any]) -> str:
    """The series' UID, after the checks that are not geometry (see load_dicom_series)."""
    series = {str(getattr(d, "SeriesInstanceUID", "")) for d in datasets}
    if len(series) != 1:
        raise DatasetError(f"files belong to {len(series)} series; send one series")
    modalities = {str(getattr(d, "Modality", "")) for d in datasets}
    if modalities != {"CT"}:
        raise DatasetError(f"the series' modality is {sorted(modalities)}, not CT")
    if any(str(getattr(d, "BurnedInAnnotation", "NO")).upper() == "YES" for d in datasets):
        raise DatasetError(
            "the images have burned-in annotation (text in the pixels, which may identify the "
            "patient); send a series without it"
        )
    return series.pop()


def _highdicom_volume(datasets: Sequence[Any]) -> Any:
    import highdicom

    options: dict[str, Any] = {
        "dtype": np.float32,
        "apply_modality_transform": True,  # each slice's own RescaleSlope/Intercept: HU
        "apply_real_world_transform": False,
        "apply_voi_transform": False,
        "apply_presentation_lut": False,
    }
    try:
        if len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1:
            return highdicom.Image.from_dataset(datasets[0], copy=False).get_volume(**options)
        return highdicom.get_volume_from_series(datasets, **options)
    except DatasetError:
        raise
    except (ValueError, AttributeError, TypeError, KeyError, RuntimeError) as exc:
        raise DatasetError(f"the series is not one regular CT volume: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    text = str(exc).strip().rstrip(".") or type(exc).__name__
    if "regularly-spaced" in text or "spacing" in text.lower():
        return f"{text} (a missing, duplicated or unevenly spaced slice?)"
    return text

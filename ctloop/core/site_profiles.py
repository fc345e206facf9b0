"""Site profiles: how a scanner and protocol shift a phantom's domain (contrast phase and the
mean HU of each tissue, intensity scale and offset, noise, blur, slice spacing, field of view,
patient size), the built-in sites, and a user's JSON profile validated strictly (an unknown key,
a wrong type or an out-of-range value is refused with the field named)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

Phase = Literal["noncontrast", "arterial", "portal", "delayed"]

# Mean HU of each tissue per contrast phase (abdominal CT literature values, rounded).
PHASE_HU: dict[str, dict[str, float]] = {
    "noncontrast": {
        "liver": 58, "spleen": 48, "kidney": 32, "stomach": 35, "pancreas": 42,
        "gallbladder": 8, "aorta": 42, "ivc": 40, "muscle": 50,
    },
    "arterial": {
        "liver": 75, "spleen": 130, "kidney": 210, "stomach": 80, "pancreas": 115,
        "gallbladder": 10, "aorta": 320, "ivc": 75, "muscle": 58,
    },
    "portal": {
        "liver": 112, "spleen": 118, "kidney": 170, "stomach": 90, "pancreas": 100,
        "gallbladder": 10, "aorta": 165, "ivc": 150, "muscle": 62,
    },
    "delayed": {
        "liver": 85, "spleen": 88, "kidney": 120, "stomach": 70, "pancreas": 80,
        "gallbladder": 12, "aorta": 110, "ivc": 108, "muscle": 60,
    },
}  # fmt: skip
FIXED_HU = {"air": -1000.0, "fat": -100.0, "visceral_fat": -90.0, "bone": 450.0,
            "marrow": 220.0, "gastric_air": -850.0, "gastric_fluid": 15.0}  # fmt: skip


TISSUES = frozenset(PHASE_HU["portal"]) | frozenset(FIXED_HU)

# Bounds of a site profile's values: wide enough for any CT protocol a hospital runs, narrow
# enough that a typo (a noise of 1200 HU, a slice spacing of 0) is refused, not simulated.
Hu = Annotated[float, Field(ge=-500.0, le=500.0)]
FovMm = Annotated[float, Field(ge=150.0, le=600.0)]
ZExtentMm = Annotated[float, Field(ge=80.0, le=600.0)]
PatientScale = Annotated[float, Field(ge=0.6, le=1.5)]


class SiteProfile(BaseModel):
    """How one site's scanners and protocol make its CTs look. A user can add one as JSON.

    Strict: a profile from a file with an unknown key, a value of the wrong type or one out of
    range is refused with the field named, never half-used. The name seeds the site's patients
    (the same name, the same patients), so it is also a file-name-safe identifier.
    """

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    description: str = ""
    phase: Phase = "portal"
    hu_offsets: dict[str, Hu] = Field(default_factory=dict)  # extra HU per tissue
    # scanner calibration: HU' = intensity_scale * HU + intensity_offset
    intensity_scale: float = Field(default=1.0, ge=0.5, le=2.0)
    intensity_offset: float = Field(default=0.0, ge=-300.0, le=300.0)
    noise_hu: float = Field(default=12.0, ge=0.0, le=150.0)  # std of the quantum noise
    blur_mm: float = Field(default=0.8, ge=0.0, le=5.0)  # in-plane point-spread (Gaussian sigma)
    slice_spacing_mm: float = Field(default=2.5, ge=0.5, le=10.0)
    fov_mm: tuple[FovMm, FovMm] = (340.0, 400.0)  # in-plane field of view, sampled per volume
    z_extent_mm: tuple[ZExtentMm, ZExtentMm] = (240.0, 280.0)  # craniocaudal coverage
    patient_scale: tuple[PatientScale, PatientScale] = (0.9, 1.1)  # body size factor
    texture_hu: float = Field(default=6.0, ge=0.0, le=60.0)  # parenchymal texture amplitude

    @field_validator("hu_offsets")
    @classmethod
    def _known_tissues(cls, offsets: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(offsets) - TISSUES)
        if unknown:
            raise ValueError(f"unknown tissue {unknown} (tissues: {', '.join(sorted(TISSUES))})")
        return offsets

    @field_validator("fov_mm", "z_extent_mm", "patient_scale")
    @classmethod
    def _low_then_high(cls, bounds: tuple[float, float]) -> tuple[float, float]:
        if bounds[0] > bounds[1]:
            raise ValueError("needs [low, high] with low <= high")
        return bounds


SITES: dict[str, SiteProfile] = {
    "public": SiteProfile(
        name="public",
        description="Labelled public set: portal-venous phase, routine dose, thin slices",
        phase="portal",
        noise_hu=10.0,
        slice_spacing_mm=1.0,
    ),
    "clinical-a": SiteProfile(
        name="clinical-a",
        description="Hospital A: non-contrast low-dose protocol, thick slices, larger patients",
        phase="noncontrast",
        intensity_scale=1.03,
        intensity_offset=-15.0,
        noise_hu=28.0,
        blur_mm=1.4,
        slice_spacing_mm=5.0,
        fov_mm=(380.0, 460.0),
        patient_scale=(1.0, 1.25),
    ),
    "clinical-b": SiteProfile(
        name="clinical-b",
        description="Hospital B: late arterial phase, other vendor calibration, small FOV",
        phase="arterial",
        intensity_scale=0.95,
        intensity_offset=25.0,
        noise_hu=18.0,
        slice_spacing_mm=3.0,
        fov_mm=(300.0, 350.0),
        patient_scale=(0.8, 1.0),
    ),
    "clinical-c": SiteProfile(
        name="clinical-c",
        description="Hospital C: delayed phase, sharp kernel, high noise",
        phase="delayed",
        noise_hu=35.0,
        blur_mm=0.5,
        slice_spacing_mm=1.5,
    ),
}


class SiteError(ValueError):
    """A site argument that names no site or a profile that cannot be used; says which and why."""


class UnknownSite(SiteError):
    pass


class InvalidSiteProfile(SiteError):
    pass


def load_site(name_or_path: str) -> SiteProfile:
    """A built-in site by name, or a user's profile from a JSON file (validated strictly)."""
    if name_or_path in SITES:
        return SITES[name_or_path]
    path = Path(name_or_path)
    if path.suffix != ".json":
        raise UnknownSite(
            f"unknown site {name_or_path!r}; built-in: {', '.join(SITES)} (or a .json profile)"
        )
    try:
        text = path.read_text()
    except OSError as exc:
        raise UnknownSite(f"site profile {path}: cannot be read ({exc.strerror})") from None
    try:
        return SiteProfile.model_validate_json(text)
    except ValidationError as exc:
        problems = "\n".join(f"  {_problem(e)}" for e in exc.errors())
        raise InvalidSiteProfile(f"site profile {path} is not valid:\n{problems}") from None


def _problem(error: Any) -> str:
    """One pydantic error as ``field: what is wrong (got value)``; the file itself is ``-``."""
    where = ".".join(str(part) for part in error["loc"]) or "-"
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown field (fields: {', '.join(SiteProfile.model_fields)})"
    if error["type"] == "missing" or not error["loc"]:
        return f"{where}: {error['msg']}"
    return f"{where}: {error['msg']} (got {error['input']!r})"

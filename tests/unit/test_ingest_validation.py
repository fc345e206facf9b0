"""What ingest decides from an upload's header alone (write it early?) agrees with what the
full read decides (keep it as it came?), and the full read takes the voxels in place."""

import gzip

import nibabel as nib
import numpy as np
import pytest

from ctloop.core.blobs import STORED_CT_DTYPES, nifti_gz_bytes
from services.ingest.validation import Limits, may_be_stored_as_is, read_nifti_upload

AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])
LIMITS = Limits(max_bytes=1 << 30, max_voxels=1 << 26)
CT = (np.random.default_rng(0).standard_normal((16, 18, 10)) * 300).astype(np.int16)


def _variants() -> dict[str, tuple[bytes, bool, bool]]:
    """name -> (upload, header says early write, full read says keep)."""
    clean = nifti_gz_bytes(CT, AFFINE)
    described = nib.Nifti1Image(CT, AFFINE)
    described.header["descrip"] = b"DOE^JANE"
    body = nib.Nifti1Image(CT, AFFINE).to_bytes()
    # scl_slope 2 (bytes 112..115): nibabel would drop it when writing an in-memory image.
    scaled = body[:112] + np.float32(2.0).tobytes() + body[116:]
    members = b"".join(gzip.compress(body[i : i + 1024]) for i in range(0, len(body), 1024))
    return {
        "clean": (clean, True, True),
        "float64": (nifti_gz_bytes(CT.astype(np.float64), AFFINE), False, False),
        "description": (gzip.compress(described.to_bytes()), False, False),
        "scaled": (gzip.compress(scaled), False, False),
        # Only the whole stream shows several gzip members: written early, then rewritten.
        "members": (members, True, False),
        "nifti2": (gzip.compress(nib.Nifti2Image(CT, AFFINE).to_bytes()), False, False),
        "uncompressed": (body, False, False),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_the_header_check_never_promises_less_than_the_full_read_keeps(name):
    data, early, keep = _variants()[name]
    assert may_be_stored_as_is(data, STORED_CT_DTYPES) is early
    upload = read_nifti_upload(data, LIMITS, dtypes=STORED_CT_DTYPES)
    assert upload.storable is keep
    assert not keep or early  # whatever is kept as it came was written early
    np.testing.assert_array_equal(upload.array, CT if name != "scaled" else CT * 2.0)


def test_an_unscaled_upload_is_read_in_place():
    upload = read_nifti_upload(nifti_gz_bytes(CT, AFFINE), LIMITS, dtypes=STORED_CT_DTYPES)
    assert not upload.array.flags.writeable  # a view of the decompressed bytes, not a copy
    assert upload.array.flags.f_contiguous and upload.array.dtype == np.int16


def test_a_pacs_answer_with_another_series_is_refused():
    """A DICOMweb pull gets only the series asked for: instances of another series (another
    patient's, or a mix of two) are refused with series_mismatch before any decoding."""
    import io

    from pydicom.uid import generate_uid

    from services.ingest.errors import ApiError
    from services.ingest.validation import read_dicom_instances
    from tests.helpers.dicom import ct_slice

    image = np.zeros((8, 8, 3), dtype=np.int16)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    asked, other = generate_uid(), generate_uid()

    def instances(uids: list[str]) -> list[bytes]:
        out = []
        for k, uid in enumerate(uids):
            buf = io.BytesIO()
            ct_slice(image, affine, k, uid).save_as(buf, enforce_file_format=True)
            out.append(buf.getvalue())
        return out

    limits = Limits(max_bytes=1 << 20, max_voxels=1 << 20)
    vol = read_dicom_instances(instances([asked] * 3), limits, asked)
    assert vol.image.shape == (8, 8, 3)
    for uids in ([other] * 3, [asked, other, asked]):
        with pytest.raises(ApiError) as err:
            read_dicom_instances(instances(uids), limits, asked)
        assert err.value.code == "series_mismatch" and err.value.status == 422

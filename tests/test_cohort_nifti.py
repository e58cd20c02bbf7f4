"""cohort.nifti.write_array: nibabel's own .nii.gz, written atomically, the same bytes for the same array
(decision 0021: ISA-L's gzip was withdrawn because its bytes depend on the CPU)."""
from __future__ import annotations

import zlib

import nibabel as nib
import numpy as np
import pytest

from cohort.nifti import read_array, read_label, write_array

AFFINE = np.array([[-1.5, 0, 0, 90.0], [0, 2.0, 0, -126.0], [0, 0, 2.5, -72.0], [0, 0, 0, 1]])


def _arrays():
    rng = np.random.default_rng(0)
    smooth = np.full((20, 24, 18), -1.0, np.float32)  # a sample's shape: constant air around noisy tissue
    smooth[4:16, 5:19, 3:15] = rng.normal(0, 0.3, (12, 14, 12)).astype(np.float32)
    return {"float32 sample": smooth,
            "float64 input": rng.normal(size=(7, 8, 9)),
            "uint8 label": rng.integers(0, 5, (20, 24, 18)).astype(np.uint8),
            "int16 values": rng.integers(-300, 300, (7, 8, 9)).astype(np.int64)}


@pytest.mark.parametrize("name", list(_arrays()))
def test_the_file_is_nibabels_own_save_whatever_its_name(name, tmp_path):
    array = _arrays()[name]
    path = write_array(tmp_path / "x.nii.gz", array, AFFINE)
    want = array.astype(np.uint8 if array.dtype == np.uint8 else
                        np.int16 if np.issubdtype(array.dtype, np.integer) else np.float32)
    img = nib.Nifti1Image(want, AFFINE)
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    for suffix in (".nii.gz", ".nii"):
        nib.save(img, str(tmp_path / f"reference{suffix}"))
    data = path.read_bytes()
    # the temporary name write_array saved under is not in the file: the same bytes as a save under another name
    assert data == (tmp_path / "reference.nii.gz").read_bytes()
    assert zlib.decompressobj(wbits=31).decompress(data) == (tmp_path / "reference.nii").read_bytes()
    assert data[3] == 0 and data[4:8] == b"\0\0\0\0"  # no file name, no time stamp in the gzip header
    assert write_array(tmp_path / "again.nii.gz", array, AFFINE).read_bytes() == data  # the same bytes again
    assert write_array(tmp_path / "x.nii", array, AFFINE).read_bytes() == (tmp_path / "reference.nii").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_what_is_written_reads_back_with_its_affine_and_values(tmp_path):
    arrays = _arrays()
    got, aff = read_array(write_array(tmp_path / "s.nii.gz", arrays["float32 sample"], AFFINE))
    np.testing.assert_array_equal(got, arrays["float32 sample"])
    np.testing.assert_allclose(aff, AFFINE)
    lab, _ = read_label(write_array(tmp_path / "l.nii.gz", arrays["uint8 label"], AFFINE))
    np.testing.assert_array_equal(lab, arrays["uint8 label"])
    loaded = nib.load(str(tmp_path / "s.nii.gz"))  # nibabel's own streamed reader, and its header codes
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), arrays["float32 sample"])
    assert int(loaded.header["qform_code"]) == 1 and int(loaded.header["sform_code"]) == 1


def test_a_name_that_is_not_nifti_is_refused_and_nothing_written(tmp_path):
    with pytest.raises(ValueError, match=r"x\.mgz: a NIfTI file name ends in \.nii\.gz or \.nii"):
        write_array(tmp_path / "x.mgz", np.zeros((2, 3, 4), np.float32), AFFINE)
    assert list(tmp_path.iterdir()) == []


def test_nifti_bytes_is_the_content_whatever_gzip_wrote_it(tmp_path):
    import gzip

    from core.errors import InputError
    from cohort.nifti import nifti_bytes

    array = _arrays()["float32 sample"]
    raw = write_array(tmp_path / "x.nii", array, AFFINE).read_bytes()
    gz = write_array(tmp_path / "x.nii.gz", array, AFFINE)
    assert nifti_bytes(tmp_path / "x.nii") == raw == nifti_bytes(gz)
    (tmp_path / "y.nii.gz").write_bytes(gzip.compress(raw, compresslevel=9))  # other bytes, the same content
    assert (tmp_path / "y.nii.gz").read_bytes() != gz.read_bytes() and nifti_bytes(tmp_path / "y.nii.gz") == raw
    (tmp_path / "cut.nii.gz").write_bytes(gz.read_bytes()[:-20])
    with pytest.raises(InputError) as e:
        nifti_bytes(tmp_path / "cut.nii.gz")
    assert e.value.kind == "unreadable" and "cut.nii.gz" in str(e.value)
    with pytest.raises(InputError, match="does not exist"):
        nifti_bytes(tmp_path / "gone.nii.gz")

"""Every kind of bad input file raises InputError whose message names the file (a bad setting: ConfigError), and no row
already in a manifest is dropped or corrupted (the manifest's sha256 is unchanged)."""
from __future__ import annotations

import gzip
import io
import shutil

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cohort.brats import import_brats, import_brats_case
from core.errors import InputError
from core.fsutil import sha256_file
from cohort.manifest import append_rows, read_case, load_manifest, validate_manifest
from cohort.nifti import write_array
from cohort.nnunet import export_nnunet
from tests.cohort_fakes import write_brats_case

CASE = "BraTS2021_00777"


@pytest.fixture(scope="module")
def base_cohort(tmp_path_factory):
    """An imported cohort with two good cases: the manifest that bad input must not damage."""
    src = tmp_path_factory.mktemp("good_src")
    rng = np.random.default_rng(11)
    for case in ("BraTS2021_00001", "BraTS2021_00002"):
        write_brats_case(src, case, rng)
    out = tmp_path_factory.mktemp("base") / "cohort"
    report = import_brats(src, out, profile="tiny", val_fraction=0, test_fraction=0)
    assert len(report.imported) == 2 and not report.bad
    return out


@pytest.fixture
def cohort_copy(base_cohort, tmp_path):
    out = tmp_path / "cohort"
    shutil.copytree(base_cohort, out)
    manifest = out / "data_manifest.csv"
    return manifest, sha256_file(manifest), load_manifest(manifest)


def _img(path):
    img = nib.load(path)
    return np.asarray(img.dataobj), img.affine


def _truncate(f):
    p = f["t1ce"]
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return p, "unreadable"


def _garbage(f):
    f["t2"].write_bytes(b"\x1f\x8b this is not a NIfTI image")
    return f["t2"], "unreadable"


def _not_3d(f):
    a, aff = _img(f["t2"])
    nib.save(nib.Nifti1Image(np.stack([a, a], axis=-1), aff), f["t2"])
    return f["t2"], "not-3d"


def _shape_mismatch(f):
    a, aff = _img(f["seg"])
    write_array(f["seg"], a[:-2], aff)
    return f["seg"], "shape-mismatch"


def _affine_mismatch(f):
    a, aff = _img(f["flair"])
    aff = aff.copy()
    aff[:3, 3] += [10.0, 0.0, 0.0]  # same voxels, shifted 10 mm
    write_array(f["flair"], a, aff)
    return f["flair"], "geometry-mismatch"


def _spacing_mismatch(f):
    a, aff = _img(f["flair"])
    aff = aff.copy()
    aff[:3, :3] *= 5.0 / 6.0  # 5 mm voxels instead of 6 mm
    write_array(f["flair"], a, aff)
    return f["flair"], "geometry-mismatch"


def _non_finite(modality, value):
    def breaker(f):
        a, aff = _img(f[modality])
        a = a.astype(np.float32)
        a[3, 4, 5] = value
        write_array(f[modality], a, aff)
        return f[modality], "non-finite"
    return breaker


def _label_outside_convention(f):
    a, aff = _img(f["seg"])
    a = a.copy()
    a[a == 2] = 3  # BraTS 2021 has no label 3
    write_array(f["seg"], a, aff)
    return f["seg"], "bad-labels"


def _empty_tumour(f):
    a, aff = _img(f["seg"])
    write_array(f["seg"], np.zeros_like(a), aff)
    return f["seg"], "empty-tumour"


def _missing_modality(f):
    f["t1ce"].unlink()
    return f["t1ce"], "missing-modality"


def _patch_header(path, **fields):
    """Rewrite NIfTI-1 header fields on disk as given (nibabel would 'fix' some of them when saving)."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    for k, v in fields.items():
        hdr[k] = v
    raw[:348] = hdr.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)))


def _constant(f):
    a, aff = _img(f["t2"])
    write_array(f["t2"], np.zeros_like(a, dtype=np.float32), aff)  # an all-zero modality (a failed conversion)
    return f["t2"], "constant-image"


def _zero_spacing(f):
    _patch_header(f["flair"], pixdim=[1, 0, 0, 0, 1, 1, 1, 1])
    return f["flair"], "bad-header"


def _no_orientation(f):
    """qform and sform codes 0 and pixdim 0 in every file: nibabel would give them all the same made-up affine."""
    for p in f.values():
        _patch_header(p, qform_code=0, sform_code=0, pixdim=[1, 0, 0, 0, 1, 1, 1, 1])
    return f["t1"], "bad-header"


def _huge_header(f):
    _patch_header(f["t2"], dim=[3, 4000, 4000, 4000, 1, 1, 1, 1], datatype=16, bitpix=32)  # 4000^3 float32
    return f["t2"], "too-large"


def _header_bigger_than_file(f):
    _patch_header(f["t1ce"], dim=[3, 600, 600, 600, 1, 1, 1, 1], datatype=16, bitpix=32)  # 0.8 GiB, under the cap
    return f["t1ce"], "size-mismatch"


BREAKERS = {"truncated-gzip": _truncate, "garbage-file": _garbage, "non-3d": _not_3d,
            "image-label-shape": _shape_mismatch, "affine-mismatch": _affine_mismatch,
            "spacing-mismatch": _spacing_mismatch, "nan": _non_finite("t1", np.nan), "inf": _non_finite("t1ce", np.inf),
            "label-outside-convention": _label_outside_convention, "empty-tumour": _empty_tumour,
            "missing-modality": _missing_modality, "constant-modality": _constant, "zero-spacing": _zero_spacing,
            "no-orientation": _no_orientation, "huge-header": _huge_header,
            "header-bigger-than-file": _header_bigger_than_file}


@pytest.mark.parametrize("breaker", list(BREAKERS))
def test_bad_case_file_is_named_and_manifest_kept(breaker, cohort_copy, tmp_path):
    manifest, before, rows_before = cohort_copy
    src = tmp_path / "src"
    files = write_brats_case(src, CASE, np.random.default_rng(1))
    bad_file, kind = BREAKERS[breaker](files)

    with pytest.raises(InputError) as e:
        import_brats_case(src / CASE, tmp_path / "scratch", "tiny", cohort="x", split="train")
    assert type(e.value) is InputError
    assert str(e.value).startswith(f"{bad_file}: "), str(e.value)
    assert e.value.kind == kind

    report = import_brats(src, manifest.parent, profile="tiny")  # into the existing cohort
    assert report.imported == [] and [c for c, _ in report.bad] == [CASE]
    assert str(bad_file) in str(report.bad[0][1])
    assert sha256_file(manifest) == before
    pd.testing.assert_frame_equal(load_manifest(manifest), rows_before)
    assert not (manifest.parent / CASE).exists()  # nothing half-written for the bad case


def test_duplicate_case_id_refused(cohort_copy):
    manifest, before, rows = cohort_copy
    with pytest.raises(InputError) as e:
        append_rows(manifest, rows.iloc[[1]])
    assert type(e.value) is InputError and e.value.kind == "duplicate-case"
    assert str(e.value).startswith(f"{manifest}: duplicate case ids ['BraTS2021_00002']")
    assert sha256_file(manifest) == before


def test_manifest_path_escaping_the_data_root_refused(cohort_copy, tmp_path):
    manifest, before, rows = cohort_copy
    outside = write_array(tmp_path / "outside.nii.gz", np.zeros((16, 20, 16), np.uint8), np.eye(4))
    new = rows.iloc[[0]].copy()
    new["case_id"], new["label"] = "sneaky", "../outside.nii.gz"
    with pytest.raises(InputError) as e:
        append_rows(manifest, new)
    assert e.value.kind == "path-escape" and "'../outside.nii.gz' escapes the data root" in str(e.value)
    assert str(e.value).startswith(str(manifest))
    assert sha256_file(manifest) == before

    # a manifest edited by hand to point outside: validate, read_case and the nnU-Net export all refuse
    edited = manifest.parent / "edited.csv"
    rows.assign(label=["../outside.nii.gz"] + rows["label"].tolist()[1:]).to_csv(edited, index=False)
    edited_hash = sha256_file(edited)
    for call in (lambda: validate_manifest(edited), lambda: read_case(edited, load_manifest(edited).iloc[0]),
                 lambda: export_nnunet(edited, tmp_path / "raw", 3, "X", rows["case_id"].tolist(), n_folds=2)):
        with pytest.raises(InputError) as e:
            call()
        assert e.value.kind == "path-escape" and str(e.value).startswith(f"{edited}: path '../outside.nii.gz'")
    assert sha256_file(edited) == edited_hash and outside.exists()


def test_file_whose_hash_no_longer_matches_refused(cohort_copy, tmp_path):
    manifest, before, rows = cohort_copy
    t2 = manifest.parent / rows.iloc[1]["t2"]
    a, aff = _img(t2)
    write_array(t2, a * 0.5, aff)  # still a valid image, but not the one the manifest recorded
    for call in (lambda: validate_manifest(manifest),
                 lambda: export_nnunet(manifest, tmp_path / "raw", 4, "X", rows["case_id"].tolist(), n_folds=2)):
        with pytest.raises(InputError) as e:
            call()
        assert e.value.kind == "hash-mismatch" and str(e.value).startswith(f"{t2}: sha256")
    assert sha256_file(manifest) == before
    assert not (tmp_path / "raw" / "Dataset004_X").exists()
    validate_manifest(manifest, check_hashes=False)  # the file itself is fine; only the hash tells


def test_bad_settings_raise_config_error_not_cohort_error(toy_cohort, tmp_path):
    """A bad setting names the setting (ConfigError); InputError is kept for bad files."""
    from cohort.atlases import load_atlas
    from core.errors import ConfigError
    from cohort.maskedit import edit_masks
    from cohort.phantom import build_phantom_cohort
    from cohort.profiles import get_profile

    calls = {"unknown profile 'nope'": lambda: get_profile("nope"),
             "unknown atlas 'nope'": lambda: load_atlas("nope"),
             "n_cases must be >= 1": lambda: build_phantom_cohort(tmp_path / "p", n_cases=0, profile="tiny"),
             "unknown edit kinds": lambda: edit_masks(toy_cohort, tmp_path / "m", 1, 0, kinds=("twist",)),
             "dataset id must be 1..999": lambda: export_nnunet(toy_cohort, tmp_path / "n", 0, "x", ["toy_000"]),
             "val_fraction": lambda: import_brats(tmp_path, tmp_path / "b", profile="tiny", val_fraction=0.6,
                                                  test_fraction=0.6)}
    for message, call in calls.items():
        with pytest.raises(ConfigError, match=message) as e:
            call()
        assert not isinstance(e.value, InputError) and e.value.path is None, message


def test_uncompressed_header_bigger_than_file_refused_before_reading(tmp_path):
    """A .nii whose header claims more voxels than the file holds is refused from its size alone."""
    from cohort.nifti import read_array

    path = write_array(tmp_path / "x.nii", np.ones((8, 9, 10), np.float32), np.eye(4))
    raw = bytearray(path.read_bytes())
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(bytes(raw)), check=False)
    hdr["dim"] = [3, 80, 90, 100, 1, 1, 1, 1]
    raw[:348] = hdr.binaryblock
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as e:
        read_array(path)
    assert e.value.kind == "size-mismatch" and str(e.value).startswith(f"{path}: header claims a 80x90x100 float32")

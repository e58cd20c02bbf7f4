"""data_manifest.csv: round trip, atomic append refusing duplicates, merge, path escapes."""
from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from core.fsutil import default_mode, sha256_file
from cohort.manifest import (COLUMNS, append_rows, load_manifest, make_row, merge_manifests, read_case,
                             resolve, validate_manifest)
from cohort.nifti import write_array
from tests.cohort_fakes import TINY_AFFINE, write_mixed_cohort
from tests.conftest import make_toy_case


def _files(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_round_trip_values_and_voxels(tmp_path):
    manifest = tmp_path / "data_manifest.csv"
    images, label = make_toy_case(np.random.default_rng(3))
    paths = {m: write_array(tmp_path / "c1" / f"{m}.nii.gz", a, TINY_AFFINE) for m, a in images.items()}
    lpath = write_array(tmp_path / "c1" / "seg.nii.gz", label, TINY_AFFINE)
    row = make_row(manifest, case_id="c1", cohort="toy", source="synthetic", split="train", images=paths,
                   label=lpath, shape=label.shape, spacing=(9, 9, 9), parent_case_id="p7", mask_edit="scale=0.8",
                   generator_checkpoint="ab" * 32, sampler="ddim", steps=50, seed=3, my_note="kept")
    append_rows(manifest, [row])
    df = load_manifest(manifest)
    assert list(df.columns[:len(COLUMNS)]) == list(COLUMNS) and "my_note" in df.columns
    r = df.iloc[0]
    assert r["t1"] == "c1/t1.nii.gz" and r["label"] == "c1/seg.nii.gz"  # relative to the manifest folder
    assert r["shape"] == "16x20x16" and r["spacing"] == "9x9x9"
    assert r["sha256_flair"] == sha256_file(paths["flair"])
    assert (r["parent_case_id"], r["steps"], r["seed"], r["my_note"]) == ("p7", "50", "3", "kept")
    case = read_case(manifest, r)  # the one case object: image and label Volumes on one grid
    np.testing.assert_array_equal(case.label_map, label)
    np.testing.assert_allclose(case.image.channel("t2"), images["t2"])
    np.testing.assert_allclose(case.image.affine, TINY_AFFINE)
    assert case.case_id == "c1" and case.label.channels == ("label",) and case.image.channels == tuple(images)
    np.testing.assert_array_equal(case.label_map, label)
    assert case.spacing == (9.0, 9.0, 9.0) and case.label.affine.tolist() == case.image.affine.tolist()
    validate_manifest(manifest, require_tumour=True)
    # atomic writes go through private temporaries but must end up with normal permissions
    for f in (manifest, paths["t1"], lpath):
        assert f.stat().st_mode & 0o777 == default_mode()


def test_append_refuses_duplicates_without_touching_the_file(toy_cohort, tmp_path):
    manifest = tmp_path / "data_manifest.csv"
    shutil.copy(toy_cohort, manifest)
    rows = load_manifest(manifest)
    before = sha256_file(manifest)
    new = rows.iloc[[0]].copy()
    new["case_id"] = "toy_new"
    dup = rows.iloc[[3]].copy()
    with pytest.raises(InputError, match=r"data_manifest.csv: duplicate case ids \['toy_003'\]"):
        append_rows(manifest, pd.concat([new, dup]))
    with pytest.raises(InputError, match="duplicate case ids"):
        append_rows(manifest, pd.concat([new, new]))  # duplicates inside the new rows too
    assert sha256_file(manifest) == before
    assert _files(tmp_path) == ["data_manifest.csv"]


def test_append_is_atomic_when_the_write_fails(toy_cohort, tmp_path, monkeypatch):
    manifest = tmp_path / "data_manifest.csv"
    shutil.copy(toy_cohort, manifest)
    before = sha256_file(manifest)
    new = load_manifest(manifest).iloc[[0]].copy()
    new["case_id"] = "toy_new"

    def half_write(self, path, *a, **k):  # write part of the file, then crash (disk full, killed ...)
        open(path, "w").write("case_id,cohort\ntoy_0")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_write)
    with pytest.raises(OSError):
        append_rows(manifest, new)
    monkeypatch.undo()
    assert sha256_file(manifest) == before
    assert _files(tmp_path) == ["data_manifest.csv"]  # no temporary left behind
    assert len(append_rows(manifest, new)) == 11


def test_merge_rebases_paths_and_refuses_duplicates(tmp_path):
    a = write_mixed_cohort(tmp_path / "a", n_real=2, n_synth=1, n_test=0, seed=1)
    b = write_mixed_cohort(tmp_path / "b", n_real=2, n_synth=0, n_test=0, seed=2, prefix="b")
    out = tmp_path / "data_manifest.csv"
    merged = merge_manifests([a, b], out)
    assert merged["case_id"].tolist() == ["r000", "r001", "s000", "br000", "br001"]
    assert merged.set_index("case_id").loc["br000", "t1"] == "b/br000/br000_t1.nii.gz"
    assert merged.set_index("case_id").loc["s000", "sha256_t1"] == load_manifest(a).iloc[2]["sha256_t1"]
    validate_manifest(out)
    with pytest.raises(InputError, match="duplicate case ids"):
        merge_manifests([a, a], tmp_path / "dup.csv")
    assert not (tmp_path / "dup.csv").exists()
    with pytest.raises(InputError, match="escapes the data root"):  # rebased paths must stay inside out's root
        merge_manifests([a], tmp_path / "a" / "r000" / "data_manifest.csv")


def test_resolve_refuses_escapes(tmp_path):
    m = tmp_path / "cohort" / "data_manifest.csv"
    assert resolve(m, "c1/t1.nii.gz") == (tmp_path / "cohort" / "c1" / "t1.nii.gz").resolve()
    for bad in ("../outside.nii.gz", "c1/../../outside.nii.gz", str(tmp_path / "abs.nii.gz")):
        with pytest.raises(InputError, match="data_manifest.csv: path") as e:
            resolve(m, bad)
        assert e.value.kind == "path-escape"


def test_case_and_volume_helpers():
    from cohort.case import Case
    from cohort.volume import Volume, select_channels, spacing_of

    c, s = np.cos(0.3), np.sin(0.3)
    oblique = np.array([[2 * c, -3 * s, 0, 1], [2 * s, 3 * c, 0, 2], [0, 0, 4, 3], [0, 0, 0, 1]])
    assert spacing_of(oblique) == pytest.approx((2.0, 3.0, 4.0))
    vol = Volume.from_channels({"t1": np.zeros((2, 3, 4)), "flair": np.ones((2, 3, 4))}, oblique)
    picked = select_channels(vol, ["flair", "t1"], "x.nii.gz", "the model")
    assert picked.channels == ("flair", "t1") and picked.data.dtype == np.float32 and picked.data[0].all()
    with pytest.raises(InputError, match=r"x.nii.gz: case c9: missing modality \['t2'\] needed by the model"):
        select_channels(vol, ["t1", "t2"], "x.nii.gz", "the model", case_id="c9")
    case = Case.from_arrays("c9", vol, np.ones((2, 3, 4), np.uint8))
    assert case.shape == (2, 3, 4) and case.label_map.sum() == 24
    with pytest.raises(ValueError, match="label grid"):
        Case.from_arrays("c9", vol, np.ones((2, 3, 5), np.uint8))


def test_select_takes_one_value_or_several(toy_cohort):
    from cohort.manifest import select

    df = load_manifest(toy_cohort)
    assert select(df, split="val")["case_id"].tolist() == ["toy_006", "toy_007"]
    assert select(df, split=["val", "test"])["case_id"].tolist() == [f"toy_{i:03d}" for i in range(6, 10)]
    assert select(df, source=("real", "synthetic"), split="val", cohort=["toy"])["case_id"].tolist() == \
        ["toy_006", "toy_007"]
    assert select(df, source="synthetic").empty



# --- the same data as a reference manifest (the repository's data_manifest.csv of the default cohort) ----------

def _refused(manifest, reference):
    from cohort.manifest import check_same_cohort

    with pytest.raises(InputError) as e:
        check_same_cohort(manifest, reference)
    assert e.value.kind == "cohort-mismatch" and f"not the data of {reference}" in str(e.value)
    assert "make env" in str(e.value)  # what to do
    return str(e.value)


def test_same_cohort_passes_and_names_the_first_difference(toy_cohort, tmp_path):
    from cohort.manifest import check_same_cohort, write_manifest

    reference = tmp_path / "reference.csv"  # like the repository's copy: no data beside it
    write_manifest(load_manifest(toy_cohort).sample(frac=1.0, random_state=1), reference)
    assert check_same_cohort(toy_cohort, reference) == []  # rows in another order: the same cohort, every byte

    changed = tmp_path / "changed.csv"
    df = load_manifest(reference)
    df.loc[df["case_id"] == "toy_004", "sha256_t2"] = "0" * 64
    write_manifest(df, changed)
    msg = _refused(toy_cohort, changed)
    assert msg.startswith(f"{toy_cohort}: case toy_004: file toy_004/toy_004_t2.nii.gz has sha256 ")
    assert "the reference 000000000000" in msg

    write_manifest(load_manifest(reference).query("case_id != 'toy_007'"), changed)  # a missing case
    assert "case toy_007 is missing (1 of the reference's 10 cases are)" in _refused(changed, reference)
    assert "case toy_007 is not in the reference" in _refused(reference, changed)

    df = load_manifest(reference)
    df.loc[df["case_id"] == "toy_002", "split"] = "test"
    write_manifest(df, changed)
    assert "case toy_002: split is 'train', the reference 'test'" in _refused(toy_cohort, changed)


def _recompressed_copy(cohort, dest, level=6):
    """A copy of a cohort as a build with another zlib would leave it: every file the same NIfTI content in other
    gzip bytes, and a manifest recording their own sha256."""
    import gzip

    from cohort.manifest import row_files, write_manifest

    shutil.copytree(cohort.parent, dest.parent)
    df = load_manifest(dest)
    for i, row in df.iterrows():
        for key, rel in row_files(row).items():
            path = dest.parent / rel
            path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes()), compresslevel=level, mtime=0))
            df.loc[i, f"sha256_{key}"] = sha256_file(path)
    write_manifest(df, dest)
    return dest


def test_the_same_content_in_other_gzip_bytes_is_the_same_cohort_where_the_reference_records_it(toy_cohort, tmp_path,
                                                                                              capsys):
    """Another zlib (zlib-ng, as some Linux distributions ship) gzips the same voxels to other bytes: a reference
    with NIfTI content hashes recognises them, names the files that differ only so, and still refuses other
    voxels; a reference without them refuses as before."""
    from cohort.manifest import NIFTI_HASH_COLUMNS, check_same_cohort, with_nifti_hashes, write_manifest
    from cohort.nifti import read_array
    from medddpm.cli import main

    reference = tmp_path / "reference.csv"
    write_manifest(with_nifti_hashes(toy_cohort), reference)
    assert all(load_manifest(reference)[c].notna().all() for c in NIFTI_HASH_COLUMNS)
    assert check_same_cohort(toy_cohort, reference) == []  # the same bytes: nothing decompressed, nothing named

    other = _recompressed_copy(toy_cohort, tmp_path / "other" / "data_manifest.csv")
    first = other.parent / load_manifest(other).iloc[0]["t1"]
    assert first.read_bytes() != (toy_cohort.parent / first.relative_to(other.parent)).read_bytes()
    named = check_same_cohort(other, reference)
    assert len(named) == 10 * 5 and named[0] == first.resolve()
    assert main(["validate", str(other), "--against", str(reference)]) == 0
    out = capsys.readouterr().out
    assert "the same data as" in out and "50 files (first" in out and "other gzip bytes" in out

    # without the content hashes (an older reference) the same files are refused, naming the first
    plain = tmp_path / "plain.csv"
    write_manifest(load_manifest(toy_cohort), plain)
    assert "case toy_000: file toy_000/toy_000_t1.nii.gz has sha256" in _refused(other, plain)

    # other voxels in other bytes: refused, and the message says the content differs
    victim = other.parent / load_manifest(other).iloc[5]["flair"]
    arr, aff = read_array(victim)
    write_array(victim, arr + np.float32(0.25), aff)
    df = load_manifest(other)
    df.loc[5, "sha256_flair"] = sha256_file(victim)
    write_manifest(df, other)
    msg = _refused(other, reference)
    assert f"case toy_005: file {df.loc[5, 'flair']} has sha256" in msg and "NIfTI content" in msg


def test_cli_validate_against_a_reference(toy_cohort, tmp_path, capsys):
    from medddpm.cli import main

    manifest = tmp_path / "cohort" / "data_manifest.csv"
    shutil.copytree(toy_cohort.parent, manifest.parent)
    reference = tmp_path / "data_manifest.csv"
    shutil.copy(toy_cohort, reference)
    assert main(["validate", str(manifest), "--against", str(reference)]) == 0
    assert "OK, 10 cases" in capsys.readouterr().out

    flipped = manifest.parent / load_manifest(manifest).iloc[3]["flair"]  # one flipped byte in one file
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x01
    flipped.write_bytes(bytes(data))
    assert main(["validate", str(manifest), "--against", str(reference)]) == 2
    err = capsys.readouterr().err
    assert str(flipped) in err and "no longer matches the manifest" in err

    # a changed voxel and a manifest rewritten to match: consistent in itself, but not the reference's data
    from cohort.manifest import write_manifest
    from cohort.nifti import read_array

    arr, aff = read_array(flipped.with_name("toy_003_t1.nii.gz"))
    write_array(flipped, arr + np.float32(0.5), aff)
    df = load_manifest(manifest)
    df.loc[3, "sha256_flair"] = sha256_file(flipped)
    write_manifest(df, manifest)
    assert main(["validate", str(manifest), "--against", str(reference)]) == 2
    err = capsys.readouterr().err
    assert f"case toy_003: file {df.loc[3, 'flair']} has sha256" in err and "not the data of" in err

"""BraTS 2021 import on a small fake BraTS folder: every good case imported, every bad case reported, resumable;
the CLI verbs import-brats and export-nnunet on the result."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from cohort.brats import assign_split, import_brats
from core.errors import InputError
from core.fsutil import sha256_file
from cohort.manifest import read_case, load_manifest, validate_manifest
from medddpm.cli import main as medddpm_main
from tests.cohort_fakes import write_brats_case

GOOD = [f"BraTS2021_{i:05d}" for i in range(4)]


@pytest.fixture(scope="module")
def brats_src(tmp_path_factory):
    """4 good cases, one with a truncated t1ce, one without flair."""
    src = tmp_path_factory.mktemp("brats_src")
    rng = np.random.default_rng(0)
    for case in GOOD + ["BraTS2021_00098", "BraTS2021_00099"]:
        write_brats_case(src, case, rng)
    t1ce = src / "BraTS2021_00098" / "BraTS2021_00098_t1ce.nii.gz"
    t1ce.write_bytes(t1ce.read_bytes()[: t1ce.stat().st_size // 2])
    (src / "BraTS2021_00099" / "BraTS2021_00099_flair.nii.gz").unlink()
    (src / "README.txt").write_text("not a case")  # stray files at the top level are ignored
    return src


def test_import_good_cases_and_report_every_bad_one(brats_src, tmp_path):
    out = tmp_path / "cohort"
    report = import_brats(brats_src, out, profile="demo")
    assert report.imported == GOOD
    assert [c for c, _ in report.bad] == ["BraTS2021_00098", "BraTS2021_00099"]
    assert all(isinstance(e, InputError) for _, e in report.bad)
    assert "BraTS2021_00098_t1ce.nii.gz" in str(report.bad[0][1]) and report.bad[0][1].kind == "unreadable"
    assert "BraTS2021_00099_flair.nii.gz" in str(report.bad[1][1]) and "missing modality" in str(report.bad[1][1])
    assert "BAD BraTS2021_00099" in report.summary()

    df = validate_manifest(out / "data_manifest.csv", require_tumour=True)
    assert df["case_id"].tolist() == GOOD
    assert set(df["cohort"]) == {"brats2021"} and set(df["source"]) == {"real"}
    assert set(df["shape"]) == {"32x40x32"} and set(df["spacing"]) == {"4.5x4.5x4.5"}
    assert df["split"].tolist() == [assign_split(c, 0, 0.1, 0.2) for c in GOOD]

    # BraTS enhancing tumour (4) is our ET (3); brain (4) is derived; NCR/ED unchanged
    src_seg = np.asarray(nib.load(brats_src / GOOD[0] / f"{GOOD[0]}_seg.nii.gz").dataobj)
    case = read_case(out / "data_manifest.csv", df.iloc[0])
    vol, lab = case.image, case.label_map
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}
    assert vol.channels == ("t1", "t1ce", "t2", "flair")
    et_ml_src = (src_seg == 4).sum() * 6.0 ** 3 / 1000
    et_ml_out = (lab == 3).sum() * 4.5 ** 3 / 1000
    assert abs(et_ml_out - et_ml_src) / et_ml_src < 0.25, (et_ml_src, et_ml_out)
    # ET is brightest on T1CE (BraTS contrast) after preprocessing
    t1ce = vol.channel("t1ce")
    assert t1ce[lab == 3].mean() > t1ce[lab == 4].mean()


def test_import_resumes_and_picks_up_a_fixed_case(brats_src, tmp_path):
    out = tmp_path / "cohort"
    import_brats(brats_src, out, profile="tiny")
    manifest = out / "data_manifest.csv"
    before = sha256_file(manifest)
    again = import_brats(brats_src, out, profile="tiny")
    assert again.imported == [] and again.skipped == GOOD and len(again.bad) == 2
    assert sha256_file(manifest) == before  # nothing rewritten

    fixed = tmp_path / "src_fixed"
    import shutil
    shutil.copytree(brats_src, fixed)
    write_brats_case(fixed, "BraTS2021_00099", np.random.default_rng(5))
    third = import_brats(fixed, out, profile="tiny")
    assert third.imported == ["BraTS2021_00099"] and third.skipped == GOOD
    assert load_manifest(manifest)["case_id"].tolist() == GOOD + ["BraTS2021_00099"]


def test_cli_import_and_export(brats_src, tmp_path, capsys):
    out = tmp_path / "cohort"
    rc = medddpm_main(["import-brats", str(brats_src), "--out", str(out), "--profile", "tiny",
                       "--test-fraction", "0", "--val-fraction", "0"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "imported 4" in err and "BAD BraTS2021_00098" in err and "BAD BraTS2021_00099" in err
    assert medddpm_main(["import-brats", str(brats_src), "--out", str(out), "--profile", "tiny", "--strict"]) == 1
    assert medddpm_main(["validate", str(out / "data_manifest.csv")]) == 0

    rc = medddpm_main(["export-nnunet", str(out / "data_manifest.csv"), "--out", str(tmp_path / "raw"),
                       "--id", "5", "--name", "Brats", "--folds", "2"])
    assert rc == 0
    ds = tmp_path / "raw" / "Dataset005_Brats"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and len(json.loads((ds / "splits_final.json").read_text())) == 2

    only_bad = tmp_path / "only_bad"
    only_bad.mkdir()
    (only_bad / "case_x").mkdir()
    assert medddpm_main(["import-brats", str(only_bad), "--out", str(tmp_path / "c2"), "--profile", "tiny"]) == 2
    assert "missing modality" in capsys.readouterr().err


def test_import_is_deterministic(brats_src, tmp_path):
    """Same source, same profile -> byte-identical files (same sha256 in both manifests)."""
    a = import_brats(brats_src, tmp_path / "a", profile="tiny").manifest
    b = import_brats(brats_src, tmp_path / "b", profile="tiny").manifest
    cols = [c for c in load_manifest(a).columns if c.startswith("sha256_") or c in ("case_id", "split", "t1")]
    pd_a, pd_b = load_manifest(a)[cols], load_manifest(b)[cols]
    assert pd_a.equals(pd_b) and pd_a["sha256_label"].notna().all()

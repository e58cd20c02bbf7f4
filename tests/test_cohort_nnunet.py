"""nnU-Net v2 raw export: layout, label mapping, splits that keep synthetic cases out of validation, and
nnU-Net's own dataset integrity check."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core.errors import InputError
from core.fsutil import default_mode
from cohort.manifest import read_case, load_manifest
from cohort.nnunet import export_nnunet, load_case_map
from tests.cohort_fakes import write_mixed_cohort


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return write_mixed_cohort(tmp_path_factory.mktemp("mixed"), n_real=6, n_synth=2, n_test=1)


def _ids(manifest, source=None, split=None):
    df = load_manifest(manifest)
    m = np.ones(len(df), bool)
    if source:
        m &= (df["source"] == source).to_numpy(bool)
    if split:
        m &= (df["split"] == split).to_numpy(bool)
    return df["case_id"][m].tolist()


def test_export_layout_labels_and_splits(mixed, tmp_path):
    train = _ids(mixed, split="train")
    test = _ids(mixed, split="test")
    ds = export_nnunet(mixed, tmp_path, 11, "Mixed", train, test)
    assert ds == tmp_path / "Dataset011_Mixed"
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["numTraining"] == len(train) == 8
    assert meta["channel_names"] == {"0": "t1", "1": "t1ce", "2": "t2", "3": "flair"}
    assert meta["labels"] == {"background": 0, "NCR": 1, "ED": 2, "ET": 3}
    assert sorted(p.name for p in (ds / "labelsTr").iterdir()) == sorted(f"{c}.nii.gz" for c in train)
    assert len(list((ds / "imagesTr").iterdir())) == 4 * len(train)
    assert sorted(p.name for p in (ds / "imagesTs").iterdir()) == [f"t000_{k:04d}.nii.gz" for k in range(4)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folders left behind"
    assert ds.stat().st_mode & 0o777 == default_mode(is_dir=True)

    # voxels: images identical to the manifest's, tumour labels kept, brain (4) -> background (0)
    df = load_manifest(mixed).set_index("case_id", drop=False)
    case = read_case(mixed, df.loc["r001"])
    vol, lab = case.image, case.label_map
    out_lab = np.asarray(nib.load(ds / "labelsTr" / "r001.nii.gz").dataobj)
    assert (lab == 4).any() and not (out_lab == 4).any()
    np.testing.assert_array_equal(out_lab, np.where(lab == 4, 0, lab))
    out_t2 = nib.load(ds / "imagesTr" / "r001_0002.nii.gz")
    np.testing.assert_allclose(np.asarray(out_t2.dataobj), vol.channel("t2"))
    np.testing.assert_allclose(out_t2.affine, vol.affine)

    # splits: every real training case validated exactly once, synthetic cases never validated
    splits = json.loads((ds / "splits_final.json").read_text())
    real, synth = set(_ids(mixed, "real", "train")), set(_ids(mixed, "synthetic"))
    assert len(splits) == 5
    val_all = [c for f in splits for c in f["val"]]
    assert sorted(val_all) == sorted(real)
    for fold in splits:
        assert not set(fold["val"]) & synth
        assert synth <= set(fold["train"])
        assert set(fold["train"]) | set(fold["val"]) == set(train)

    cmap = load_case_map(ds)
    assert dict(zip(cmap["nnunet_case"], cmap["case_id"])) == {c: c for c in train + test}
    assert set(cmap.loc[cmap["subset"] == "imagesTs", "case_id"]) == set(test)


def test_explicit_validation_fold_refuses_synthetic(mixed, tmp_path):
    train = _ids(mixed, split="train")
    with pytest.raises(InputError, match="only real cases"):
        export_nnunet(mixed, tmp_path, 12, "Bad", train, val_ids=["s000"])
    assert not list(tmp_path.iterdir()), "a refused export must leave nothing behind"
    ds = export_nnunet(mixed, tmp_path, 12, "Good", train, val_ids=["r000", "r001"], regions=True)
    splits = json.loads((ds / "splits_final.json").read_text())
    assert splits == [{"train": sorted(set(train) - {"r000", "r001"}), "val": ["r000", "r001"]}]
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["labels"]["TC"] == [1, 3] and meta["regions_class_order"] == [2, 1, 3]


def test_reexport_replaces_whole_dataset_and_refuses_id_clash(mixed, tmp_path):
    train = _ids(mixed, split="train")
    export_nnunet(mixed, tmp_path, 13, "Mix", train)
    ds = export_nnunet(mixed, tmp_path, 13, "Mix", train[:4])  # fewer cases: no stale files may remain
    assert len(list((ds / "labelsTr").iterdir())) == 4
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 4
    with pytest.raises(InputError, match="already used"):
        export_nnunet(mixed, tmp_path, 13, "Other", train)
    with pytest.raises(InputError, match="not in the manifest"):
        export_nnunet(mixed, tmp_path, 14, "X", ["nope"])


def _nnunet_env(tmp_path, raw):
    return {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(tmp_path / "pre"),
            "nnUNet_results": str(tmp_path / "res"), "nnUNet_def_n_proc": "1"}


def test_nnunet_integrity_check_accepts_export(mixed, tmp_path):
    """nnU-Net's own verify_dataset_integrity (what --verify_dataset_integrity runs) accepts the export.

    Run in a subprocess: nnU-Net uses spawn pools, which must not re-import pytest's main module.
    """
    raw = tmp_path / "raw"
    ds = export_nnunet(mixed, raw, 22, "Toy", _ids(mixed, split="train"), _ids(mixed, split="test"), regions=True)
    code = ("from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity\n"
            f"verify_dataset_integrity({str(ds)!r}, 1)\n")
    proc = subprocess.run([sys.executable, "-c", code], env=_nnunet_env(tmp_path, raw), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verify_dataset_integrity Done" in proc.stdout


@pytest.mark.slow
def test_nnunet_plan_and_preprocess_verifies_export(mixed, tmp_path):
    """The full CLI: integrity check, fingerprint, planning and preprocessing; our split is adopted.

    Slow on a shared 2-core machine (about 1-3.5 min, mostly planning), hence marked slow; the default suite
    runs the integrity check alone above.
    """
    train = _ids(mixed, split="train")
    raw = tmp_path / "raw"
    ds = export_nnunet(mixed, raw, 21, "Toy", train, _ids(mixed, split="test"))
    exe = Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"
    proc = subprocess.run([str(exe), "-d", "21", "--verify_dataset_integrity", "-c", "3d_fullres", "-np", "1"],
                          env=_nnunet_env(tmp_path, raw), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "verify_dataset_integrity Done" in proc.stdout
    pre = tmp_path / "pre" / ds.name
    assert json.loads((pre / "splits_final.json").read_text()) == json.loads((ds / "splits_final.json").read_text())
    assert len(list((pre / "nnUNetPlans_3d_fullres").glob("*.b2nd"))) + \
        len(list((pre / "nnUNetPlans_3d_fullres").glob("*.npz"))) >= len(train)

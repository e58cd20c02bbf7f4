"""Every source layout imports (BraTS 2021, BraTS 2023+, MSD Task01 with 4-D images, nnU-Net v2 with a user
mapping) and one tumour drawn in each convention lands as the same NCR/ED/ET voxels; mapping errors are one
clear InputError; the worker pool gives the serial import's manifest."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from cohort.brats import import_brats, import_cohort
from core.errors import InputError
from cohort.layouts import detect_layout
from cohort.manifest import read_case, load_manifest
from medddpm.cli import main as medddpm_main
from tests.cohort_fakes import NNUNET_MAPS, write_brats_case, write_layout_case

CASES = {"brats2021": "BraTS2021_00007", "brats2023": "BraTS-GLI-00007-000", "msd": "BRATS_007",
         "msd-permuted": "BRATS_007", "nnunet": "case_007"}
FILE_HASHES = ["sha256_t1", "sha256_t1ce", "sha256_t2", "sha256_flair", "sha256_label"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The same toy case (same seed) in every layout; msd-permuted: MSD with another channel order in its json."""
    roots = {}
    for name, case in CASES.items():
        root = tmp_path_factory.mktemp(name)
        layout = "msd" if name.startswith("msd") else name
        perm = {"0": "T2w", "1": "t1gd", "2": "FLAIR", "3": "T1w"} if name == "msd-permuted" else None
        write_layout_case(root, layout, case, np.random.default_rng(7), msd_modality=perm)
        roots[name] = root
    return roots


@pytest.fixture(scope="module")
def imported(sources, tmp_path_factory):
    out = {}
    for name, root in sources.items():
        maps = NNUNET_MAPS if name == "nnunet" else {}
        report = import_cohort(root, tmp_path_factory.mktemp(f"out_{name}"), profile="demo", **maps)
        assert report.imported == [CASES[name]] and not report.bad, report.summary()
        out[name] = report.manifest
    return out


def test_layout_is_detected(sources):
    assert {n: detect_layout(r) for n, r in sources.items()} == {n: n.split("-")[0] for n in sources}


def test_one_tumour_in_every_convention_lands_as_the_same_voxels(sources, imported):
    rows = {n: load_manifest(m).iloc[0] for n, m in imported.items()}
    ref = rows["brats2021"]
    case = read_case(imported["brats2021"], ref)
    vol, lab = case.image, case.label_map
    assert all((lab == v).sum() > 0 for v in (1, 2, 3))  # NCR, ED and ET all present (the test can fail)
    for name, row in rows.items():
        assert row[FILE_HASHES].tolist() == ref[FILE_HASHES].tolist(), name  # byte-identical label and images
    assert {n: r["cohort"] for n, r in rows.items()} == {
        "brats2021": "brats2021", "brats2023": "brats2023", "msd": "msd-task01", "msd-permuted": "msd-task01",
        "nnunet": sources["nnunet"].name.lower()}
    # the regions follow the source's contrast: ET brightest on T1CE, ED bright on FLAIR
    assert vol.channel("t1ce")[lab == 3].mean() > vol.channel("t1ce")[lab == 4].mean()
    assert vol.channel("flair")[lab == 2].mean() > vol.channel("flair")[lab == 4].mean()


def test_a_wrong_label_map_gives_other_voxels(sources, tmp_path):
    """The same MSD case with edema and non-enhancing tumour swapped by the user (a mapping file) lands
    differently."""
    swap = tmp_path / "swap.json"
    swap.write_text(json.dumps({"1": "NCR", "2": "ED"}))
    rep = import_cohort(sources["msd"], tmp_path / "swapped", profile="demo", label_map=str(swap))
    assert rep.imported == ["BRATS_007"]
    case = read_case(rep.manifest, load_manifest(rep.manifest).iloc[0])
    _, lab = case.image, case.label_map
    rep_ok = import_cohort(sources["msd"], tmp_path / "ok", profile="demo")
    case = read_case(rep_ok.manifest, load_manifest(rep_ok.manifest).iloc[0])
    _, lab_ok = case.image, case.label_map
    assert ((lab == 1) == (lab_ok == 2)).all() and ((lab == 2) == (lab_ok == 1)).all() and (lab_ok == 1).any()


def test_nnunet_unmapped_channel_or_label_refused(sources, tmp_path):
    ds_json = sources["nnunet"] / "dataset.json"
    with pytest.raises(InputError) as e:
        import_cohort(sources["nnunet"], tmp_path / "a", profile="tiny")
    assert e.value.kind == "unmapped-channel" and str(e.value).startswith(f"{ds_json}: channel 2 ('CE')")
    assert "--channel-map 2=t1ce" in str(e.value)
    with pytest.raises(InputError) as e:
        import_cohort(sources["nnunet"], tmp_path / "b", profile="tiny", channel_map="CE=t1ce")
    assert e.value.kind == "unmapped-label" and "label 3 ('core')" in str(e.value)
    assert not (tmp_path / "a" / "data_manifest.csv").exists() and not (tmp_path / "b").exists()


def test_labels_that_cannot_express_our_regions_refused(sources, tmp_path):
    with pytest.raises(InputError) as e:  # core and enhancing both made NCR: no ET left
        import_cohort(sources["nnunet"], tmp_path / "x", profile="tiny", channel_map="2=t1ce",
                      label_map="core=NCR,enhancing=NCR")
    assert e.value.kind == "bad-mapping" and "cannot express our regions: nothing maps to ['ET']" in str(e.value)
    src = tmp_path / "msd_wt"  # an MSD-like dataset with a single whole-tumour label
    src.mkdir()
    meta = json.loads((sources["msd"] / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "tumour"}
    (src / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(InputError) as e:
        import_cohort(src, tmp_path / "y", profile="tiny", label_map="1=ED")
    assert str(e.value).startswith(f"{src / 'dataset.json'}: the labels cannot express our regions")
    assert "['NCR', 'ET']" in str(e.value)


def test_brats2024_pediatric_labels_need_a_map(tmp_path):
    """BraTS-PED 2024 stores 1 ET, 2 NET, 3 CC, 4 ED: the default 2023 map refuses the case, naming the file;
    a label map imports it."""
    import nibabel as nib

    src = tmp_path / "ped"
    files = write_layout_case(src, "brats2023", "BraTS-PED-00001-000", np.random.default_rng(3))
    seg = nib.load(files["seg"])
    ours = np.asarray(seg.dataobj)
    ped = np.select([ours == 3, ours == 1, ours == 2], [1, 2, 4], 0).astype(np.uint8)  # ET->1, NCR->2, ED->4
    nib.save(nib.Nifti1Image(ped, seg.affine, seg.header), files["seg"])
    rep = import_cohort(src, tmp_path / "a", profile="tiny")
    assert rep.imported == [] and rep.bad[0][1].kind == "bad-labels"
    assert str(rep.bad[0][1]).startswith(f"{files['seg']}: label values [4]")
    rep = import_cohort(src, tmp_path / "b", profile="demo", label_map="1=ET,2=NCR,3=NCR,4=ED")
    assert rep.imported == ["BraTS-PED-00001-000"]
    case = read_case(rep.manifest, load_manifest(rep.manifest).iloc[0])
    _, lab = case.image, case.label_map
    assert all((lab == v).any() for v in (1, 2, 3))


def test_cli_import_cohort_nnunet_with_maps(sources, tmp_path, capsys):
    src = sources["nnunet"]
    out = tmp_path / "cli"
    rc = medddpm_main(["import-cohort", str(src), "--out", str(out), "--profile", "tiny", "--channel-map", "2=t1ce",
                       "--label-map", "core=NCR", "--layout", "nnunet"])
    assert rc == 0 and "imported 1" in capsys.readouterr().out
    assert load_manifest(out / "data_manifest.csv")["case_id"].tolist() == ["case_007"]
    assert medddpm_main(["import-cohort", str(src), "--out", str(tmp_path / "c"), "--profile", "tiny"]) == 2
    assert "channel 2 ('CE') is not a modality we recognise" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_workers_give_the_serial_manifest_keep_bad_cases_and_resume(tmp_path):
    """Two worker processes on a BraTS folder with a bad case: the serial import's manifest row for row (case
    order, hashes) and report; a rerun skips every good case."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(4):
        write_brats_case(src, f"BraTS2021_{i:05d}", rng)
    (src / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz").unlink()
    serial = import_brats(src, tmp_path / "serial", profile="tiny")
    rep = import_brats(src, tmp_path / "out", profile="tiny", workers=2)
    good = ["BraTS2021_00000", "BraTS2021_00002", "BraTS2021_00003"]
    assert rep.imported == serial.imported == good and [c for c, _ in rep.bad] == ["BraTS2021_00001"]
    assert rep.bad[0][1].kind == "missing-modality" and "BraTS2021_00001_t2.nii.gz" in str(rep.bad[0][1])
    assert load_manifest(rep.manifest).equals(load_manifest(serial.manifest))
    again = import_brats(src, tmp_path / "out", profile="tiny", workers=2)
    assert again.imported == [] and again.skipped == good


def test_import_cohort_cases_from_imports_the_listed_cases_records_the_list_and_refuses_unknown_ids(tmp_path,
                                                                                                     capsys):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(3):
        write_brats_case(src, f"BraTS2021_{i:05d}", rng)
    listed = tmp_path / "picks.txt"
    listed.write_text("# hand-picked\nBraTS2021_00002\nBraTS2021_00000  # good one\n")
    out = tmp_path / "out"
    assert medddpm_main(["import-brats", str(src), "--out", str(out), "--profile", "tiny",
                         "--cases-from", str(listed)]) == 0
    assert load_manifest(out / "data_manifest.csv")["case_id"].tolist() == ["BraTS2021_00000", "BraTS2021_00002"]
    record = json.loads((out / "case_list.json").read_text())
    assert record["sha256"] == hashlib.sha256(listed.read_bytes()).hexdigest() and record["n_cases"] == 2
    capsys.readouterr()
    bad = tmp_path / "bad.txt"
    bad.write_text("BraTS2021_00001\nBraTS2021_00042\nBraTS2021_00077\n")
    assert medddpm_main(["import-brats", str(src), "--out", str(tmp_path / "x"), "--profile", "tiny",
                         "--cases-from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "BraTS2021_00042, BraTS2021_00077" in err and "BraTS2021_00001" not in err
    assert not (tmp_path / "x").exists()

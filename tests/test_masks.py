"""Conditioning masks checked before synthesis (synth.mask_check), `medddpm import-masks` and curated case lists
(`--cases-from`), on the toy cohort (tiny profile)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from core.errors import InputError
from cohort.case_list import read_case_list
from cohort.import_masks import import_masks
from cohort.labels import BRAIN
from cohort.manifest import append_rows, case_files, load_manifest, make_row
from cohort.nifti import read_label, write_array
from medddpm.cli import main as cli_main
from synth.synthesize import SynthesisConfig, synthesize_cohort
from synth.train import train_medddpm

FAST = {"num_threads": 1, "progress": False}
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def generator(toy_cohort, tmp_path_factory):
    """A tiny-profile generator after 2 steps: the checks look only at its config, not at its samples."""
    return train_medddpm(toy_cohort, "tiny", tmp_path_factory.mktemp("gen"),
                         {**FAST, "steps": 2, "checkpoint_every": 2})


def _toy_label(toy_cohort: Path, cid: str = "toy_000"):
    df = load_manifest(toy_cohort)
    return read_label(case_files(toy_cohort, df[df["case_id"] == cid].iloc[0]).label)


def _masks_manifest(root: Path, masks: dict[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    manifest = root / "data_manifest.csv"
    rows = []
    for cid, (lab, aff) in masks.items():
        p = write_array(root / f"{cid}.nii.gz", lab, aff)
        rows.append(make_row(manifest, case_id=cid, cohort="drawn", source="mask", split="train", images={},
                             label=p, shape=lab.shape, spacing=np.abs(np.diag(aff)[:3])))
    append_rows(manifest, rows)
    return manifest


def _synth(generator, masks, out, count=1):
    return synthesize_cohort(generator, masks, out, SynthesisConfig(count=count, sampler="ddim", steps=2,
                                                                    max_retries=0, sources=("mask",),
                                                                    progress=False, num_threads=1))


def test_synthesis_refuses_every_bad_mask_by_name_before_the_first_sample(generator, toy_cohort, tmp_path):
    lab, aff = _toy_label(toy_cohort)
    no_brain = np.where(lab == BRAIN, 0, lab).astype(np.uint8)
    unknown = lab.copy()
    unknown[0, 0, 0] = 7
    coarse = np.diag([18.0, 18.0, 18.0, 1.0])
    masks = _masks_manifest(tmp_path / "masks", {"good": (lab, aff), "no_brain": (no_brain, aff),
                                                 "unknown": (unknown, aff), "small": (lab[::2, ::2, ::2], coarse)})
    with pytest.raises(InputError) as e:
        _synth(generator, masks, tmp_path / "out", count=4)
    msg = str(e.value)
    lines = msg.splitlines()
    assert "3 of 4 conditioning mask(s)" in lines[0]
    assert any("no_brain.nii.gz" in ln and "no brain label (4)" in ln and "import-masks" in ln for ln in lines)
    assert any("unknown.nii.gz" in ln and "label values [7]" in ln for ln in lines)
    assert any("small.nii.gz" in ln and "grid 8x10x8" in ln for ln in lines)
    assert any("small.nii.gz" in ln and "spacing [18.0, 18.0, 18.0]" in ln for ln in lines)
    assert not any("good.nii.gz" in ln for ln in lines)
    assert not (tmp_path / "out" / "data_manifest.csv").exists()  # refused before any case was made


def test_cli_synthesize_names_the_mask_without_a_brain_label(generator, toy_cohort, tmp_path, capsys):
    lab, aff = _toy_label(toy_cohort)
    masks = _masks_manifest(tmp_path / "masks", {"drawn": (np.where(lab == BRAIN, 0, lab).astype(np.uint8), aff)})
    rc = cli_main(["synthesize", "--checkpoint", str(generator), "--masks", str(masks), "--out",
                   str(tmp_path / "out"), "--count", "1", "--steps", "2", "--sampler", "ddim"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "drawn.nii.gz: no brain label (4)" in err and "--brain-from" in err


def test_a_multichannel_mask_is_refused_with_its_channel_count(generator, toy_cohort, tmp_path):
    from synth.checkpoint import load_generator
    from synth.mask_check import mask_problems

    lab, aff = _toy_label(toy_cohort)
    one_hot = np.stack([(lab == v).astype(np.float32) for v in (1, 2, 3, 4)])
    cfg = load_generator(generator)[1]
    problems = mask_problems("onehot.nii.gz", one_hot, aff, cfg)
    assert len(problems) == 1 and "has 4 channels" in problems[0] and "one 3-D label map" in problems[0]
    assert mask_problems("ok.nii.gz", lab[None].astype(np.float32), aff, cfg) == []


def _drawn_masks(toy_cohort: Path, folder: Path, images: Path | None = None) -> None:
    """toy_000 and toy_001 written as user-drawn masks without the brain label (and, optionally, their T1s)."""
    df = load_manifest(toy_cohort)
    for cid in ("toy_000", "toy_001"):
        files = case_files(toy_cohort, df[df["case_id"] == cid].iloc[0])
        lab, aff = read_label(files.label)
        write_array(folder / f"{cid}.nii.gz", np.where(lab == BRAIN, 0, lab).astype(np.uint8), aff)
        if images is not None:
            (images / f"{cid}_t1.nii.gz").parent.mkdir(parents=True, exist_ok=True)
            (images / f"{cid}_t1.nii.gz").write_bytes(files.images["t1"].read_bytes())


def test_import_masks_adds_the_brain_label_from_the_image_and_synthesis_accepts_it(generator, toy_cohort,
                                                                                   tmp_path):
    src, images = tmp_path / "drawn", tmp_path / "images"
    src.mkdir()
    _drawn_masks(toy_cohort, src, images)
    out = tmp_path / "imported"
    with pytest.raises(InputError, match="toy_000.nii.gz: has no brain label"):  # no --brain-from: refused
        import_masks(src, tmp_path / "refused", "tiny")
    assert cli_main(["import-masks", str(src), "--out", str(out), "--profile", "tiny", "--brain-from", "image",
                     "--images", str(images)]) == 0
    df = load_manifest(out / "data_manifest.csv")
    assert df["source"].tolist() == ["mask", "mask"] and df["case_id"].tolist() == ["toy_000", "toy_001"]
    got, got_aff = read_label(case_files(out / "data_manifest.csv", df.iloc[0]).label)
    want, want_aff = _toy_label(toy_cohort)
    # the import crops to the mask's bounding box and pads centred (as import-cohort): compare in world position
    shift = np.round((got_aff[:3, 3] - want_aff[:3, 3]) / 9.0).astype(int)
    assert np.allclose(got_aff[:3, :3], want_aff[:3, :3]) and (shift >= 0).all()
    want_here = np.zeros_like(want)
    want_here[tuple(slice(0, n - s) for n, s in zip(want.shape, shift))] = want[tuple(slice(s, None) for s in shift)]
    # the toy brain is an ellipsoid brighter than its background: its label comes back voxel for voxel
    assert np.array_equal(got, want_here)
    manifest = _synth(generator, out / "data_manifest.csv", tmp_path / "syn", count=2)
    assert len(load_manifest(manifest)) == 2


def test_import_masks_from_the_atlas_template(generator, toy_cohort, tmp_path):
    from cohort.atlases import WHEELS, cache_dir

    if not all((cache_dir() / w.filename).exists() for w in WHEELS.values()):
        from conftest import skip_or_fail

        skip_or_fail(f"atlas wheels not in {cache_dir()} (make env fetches them)")
    src = tmp_path / "drawn"
    src.mkdir()
    _drawn_masks(toy_cohort, src)
    out = tmp_path / "imported"
    assert cli_main(["import-masks", str(src), "--out", str(out), "--profile", "tiny",
                     "--brain-from", "template"]) == 0
    df = load_manifest(out / "data_manifest.csv")
    got, _ = read_label(case_files(out / "data_manifest.csv", df.iloc[0]).label)
    assert (got == BRAIN).sum() > 500  # an adult brain at 9 mm: ~1.4 l / 0.73 ml per voxel ~ 1900 voxels
    manifest = _synth(generator, out / "data_manifest.csv", tmp_path / "syn", count=1)
    assert len(load_manifest(manifest)) == 1


# --- curated case lists ----------------------------------------------------------------------------------------

def test_case_list_reads_ids_and_comments_and_refuses_unknown_ids(tmp_path):
    f = tmp_path / "subset.txt"
    f.write_text("# the authors' picks\ntoy_000\n\ntoy_002  # second\ntoy_000\n")
    cases = read_case_list(f)
    assert cases.case_ids == ("toy_000", "toy_002")
    assert cases.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    with pytest.raises(InputError) as e:
        cases.check_known(["toy_000", "toy_001"], "the cohort")
    assert str(f) in str(e.value) and "toy_002" in str(e.value) and "toy_000" not in str(e.value).split(":")[-1]


def test_import_masks_cases_from_records_the_subset_and_refuses_unknown_ids(toy_cohort, tmp_path):
    src = tmp_path / "drawn"
    src.mkdir()
    _drawn_masks(toy_cohort, src)
    bad = tmp_path / "bad.txt"
    bad.write_text("toy_000\ntoy_999\n")
    rc = cli_main(["import-masks", str(src), "--out", str(tmp_path / "x"), "--profile", "tiny",
                   "--brain-from", "template", "--cases-from", str(bad)])
    assert rc == 2 and not (tmp_path / "x" / "data_manifest.csv").exists()
    good = tmp_path / "good.txt"
    good.write_text("toy_001\n")
    out = tmp_path / "y"
    assert cli_main(["import-masks", str(src), "--out", str(out), "--profile", "tiny", "--brain-from", "template",
                     "--cases-from", str(good)]) == 0
    assert load_manifest(out / "data_manifest.csv")["case_id"].tolist() == ["toy_001"]
    record = json.loads((out / "case_list.json").read_text())
    assert record["sha256"] == hashlib.sha256(good.read_bytes()).hexdigest() and record["case_ids"] == ["toy_001"]


def test_train_cases_from_trains_on_the_listed_rows_only_and_records_the_list(toy_cohort, tmp_path, capsys):
    listed = tmp_path / "picks.txt"
    listed.write_text("toy_001\ntoy_004  # hand-picked\n")
    out = tmp_path / "gen"
    assert cli_main(["train", "--manifest", str(toy_cohort), "--profile", "tiny", "--out", str(out), "--steps", "1",
                     "--checkpoint-every", "1", "--threads", "1", "--no-progress", "--cases-from", str(listed)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["train_cases"] == ["toy_001", "toy_004"]
    sha = hashlib.sha256(listed.read_bytes()).hexdigest()
    assert Path(config["manifest"]).name == f"cases_{sha[:12]}.csv"
    assert json.loads((out / "case_list.json").read_text())["sha256"] == sha
    bad = tmp_path / "bad.txt"
    bad.write_text("toy_001\nnot_a_case\n")
    capsys.readouterr()
    assert cli_main(["train", "--manifest", str(toy_cohort), "--profile", "tiny", "--out", str(tmp_path / "g2"),
                     "--steps", "1", "--threads", "1", "--no-progress", "--cases-from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: 1 case ID(s) not in {toy_cohort}: not_a_case" in err


def test_study_cases_from_stays_out_of_existing_study_keys_and_is_named_in_the_report(tmp_path):
    from eval.report import build_report
    from eval.results import write_results
    from flows.plan import StudyParams
    from tests.test_eval_report import _per_case

    assert StudyParams().study_key == StudyParams(cases_from=None).study_key
    assert StudyParams(cases_from="picks.txt").study_key != StudyParams().study_key
    study = tmp_path / "study"
    write_results(study, per_case=_per_case(np.random.default_rng(0), "test", ["a", "b", "c"]))
    sha = "ab" * 32
    (study / "study.json").write_text(json.dumps({"parameters": {"cases_from": "picks.txt"},
                                                  "case_list": {"file": "picks.txt", "sha256": sha, "n_cases": 193}}))
    report = (build_report(study) / "report.md").read_text()
    assert f"only the 193 real cases listed in picks.txt (sha256 {sha})" in report


@pytest.fixture(scope="module")
def harness():
    import os

    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    with prefect_test_harness(server_startup_timeout=300):
        yield


def test_tiny_study_on_a_case_list_uses_and_records_only_the_listed_cases(harness, toy_cohort, tmp_path):
    from flows.study import augment_study

    listed = tmp_path / "picks.txt"
    listed.write_text("# curated\ntoy_000\ntoy_002\ntoy_003\ntoy_005\ntoy_008\ntoy_009\n")
    study = tmp_path / "study"
    kw = dict(cohort_manifest=str(toy_cohort), profile="tiny", n_real=3, seeds=[0], mixes=["1:0"], holdout_masks=0,
              segmenter_config={"epochs": 1, "iters_per_epoch": 1, "num_threads": 1}, parallel=1)
    augment_study(out=str(study), cases_from=str(listed), **kw)
    record = json.loads((study / "study.json").read_text())
    sha = hashlib.sha256(listed.read_bytes()).hexdigest()
    assert record["case_list"] == {"file": str(listed), "sha256": sha, "n_cases": 6}
    assert set(record["cohort"]["train_case_ids"]) <= {"toy_000", "toy_002", "toy_003", "toy_005"}
    assert record["test_sets"][0]["n"] == 2  # toy_008, toy_009 (of the listed cases, the test split)
    assert f"listed in {listed} (sha256 {sha})" in (study / "report" / "report.md").read_text()
    bad = tmp_path / "bad.txt"
    bad.write_text("toy_000\ntoy_404\n")
    with pytest.raises(InputError, match="toy_404"):
        augment_study(out=str(tmp_path / "bad-study"), cases_from=str(bad), **kw)

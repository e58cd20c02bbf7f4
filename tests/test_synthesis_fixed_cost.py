"""synthesize_cohort's per-volume work besides the network (issue 33): each mask read once, the manifest appended
from memory, the gate's shared regions computed once, gate and writes on the run's threads; the same bytes as
before, and the same crash-safety (tiny profile, toy cohort)."""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from cohort.labels import BACKGROUND, BRAIN, TUMOUR_LABELS
from cohort.manifest import case_files, load_manifest
from cohort.nifti import read_array, read_label, write_array
from core.errors import InputError
from synth import quality
from synth.synthesize import SynthesisConfig, case_seed, synthesize_cohort
from synth.train import train_medddpm

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the machine is shared, 2 threads thrash
MODALITIES = ("t1", "t1ce", "t2", "flair")


# --- the gate's statistics: the implementation before the shared regions, kept as the oracle --------------------

def _old_residual_spread(x, inner):
    from scipy.ndimage import uniform_filter

    r = (x - uniform_filter(x, size=3, mode="nearest"))[inner]
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def _old_texture(channel, label):
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(label > 0)
    normal = label == BRAIN
    if inner.sum() < quality.MIN_VOXELS or normal.sum() < quality.MIN_VOXELS:
        return float("nan")
    x = np.asarray(channel, dtype=np.float64)
    q25, q75 = np.percentile(x[normal], [25, 75])
    return _old_residual_spread(x, inner) / max(float(q75 - q25), 1e-6)


def _old_case_statistics(image, label, modalities):
    image = np.asarray(image)
    out: dict = {check: {} for check in quality.CHECKS}
    medians = {}
    for v in np.unique(label).tolist():
        sel = label == v
        if sel.sum() < quality.MIN_VOXELS:
            continue
        med = np.array([float(np.median(image[ci][sel])) for ci in range(len(modalities))])
        if v == BACKGROUND:
            out["background"] = {m: float(x) for m, x in zip(modalities, med)}
        elif v in quality.GATED_LABELS:
            medians[v] = med
            out["median"][str(v)] = {m: float(x) for m, x in zip(modalities, med)}
    pairs = list(itertools.combinations(range(len(modalities)), 2))
    if BRAIN in medians:
        for v in TUMOUR_LABELS:
            if v in medians:
                con = medians[v] - medians[BRAIN]
                out["contrast"][str(v)] = {f"{modalities[a]}-{modalities[b]}": float(con[a] - con[b])
                                           for a, b in pairs}
    normal = label == BRAIN
    for ci, m in enumerate(modalities):
        t = _old_texture(image[ci], label)
        if np.isfinite(t):
            out["texture"][m] = t
        if normal.sum() >= quality.MIN_VOXELS:
            out["q95"][m] = float(np.percentile(image[ci][normal], 95))
    brain = label > 0
    if brain.sum() >= quality.MIN_VOXELS and len(modalities) > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            r = np.nan_to_num(np.corrcoef(image[:, brain].astype(np.float64)), nan=0.0)
        out["correlation"] = {f"{modalities[a]}~{modalities[b]}": float(np.arctanh(np.clip(r[a, b], -quality._MAX_R,
                                                                                            quality._MAX_R)))
                              for a, b in pairs}
    return out


def _gate_cases(toy_cohort: Path):
    """(image, label) pairs: the toy cohort's real cases (model space), random images on them and on random labels
    (even and odd voxel counts, labels under MIN_VOXELS, a mask without brain, one whose eroded brain is empty)."""
    rng = np.random.default_rng(7)
    df = load_manifest(toy_cohort)
    cases = []
    for _, row in df.iloc[:3].iterrows():
        cf = case_files(toy_cohort, row)
        lab = read_label(cf.label)[0]
        img = np.stack([read_array(cf.images[m])[0] for m in MODALITIES])
        img = (img - img.mean()) / (img.std() + 1e-6)
        cases += [(img.astype(np.float32), lab), (rng.normal(size=img.shape).astype(np.float32), lab)]
    shape = (4, 11, 13, 9)  # odd voxel counts: medians of odd and even lengths
    labels = (rng.integers(0, 5, shape[1:]), rng.choice([0, 4], shape[1:]), np.where(rng.random(shape[1:]) < .98, 0, 4),
              np.pad(np.full((3, 3, 3), 4), ((4, 4), (5, 5), (3, 3))), rng.choice([0, 1, 2], shape[1:]))
    for lab in labels:
        lab = lab.astype(np.uint8)
        lab[0, 0, :3] = 3  # a label with 3 voxels (< MIN_VOXELS) somewhere
        cases.append((rng.normal(size=shape).astype(np.float32), lab))
    return cases


def test_gate_statistics_equal_the_per_modality_implementation_exactly(toy_cohort, monkeypatch):
    import scipy.ndimage

    erosions = []
    real_erosion = scipy.ndimage.binary_erosion
    monkeypatch.setattr(scipy.ndimage, "binary_erosion", lambda *a, **k: erosions.append(1) or real_erosion(*a, **k))
    for image, label in _gate_cases(toy_cohort):
        want = _old_case_statistics(image, label, MODALITIES)
        erosions.clear()
        got = quality.case_statistics(image, label, MODALITIES)
        assert got == want  # every value bit for bit (floats compared with ==)
        assert len(erosions) == 1  # the eroded brain once per sample, not once per modality
        for ci in range(len(MODALITIES)):  # texture() itself unchanged
            a, b = quality.texture(image[ci], label), _old_texture(image[ci], label)
            assert a == b or (np.isnan(a) and np.isnan(b))


# --- synthesis: masks read once, interruption and resume, threads ------------------------------------------------

@pytest.fixture(scope="module")
def generator(toy_cohort, tmp_path_factory):
    """A tiny-profile generator after 2 training steps (its samples fail the gate: redraws happen)."""
    return train_medddpm(toy_cohort, "tiny", tmp_path_factory.mktemp("gen"),
                         {"num_threads": 1, "progress": False, "steps": 2, "checkpoint_every": 2})


def _config(**kw) -> SynthesisConfig:
    return SynthesisConfig(**{"count": 6, "sampler": "ddim", "steps": 2, "seed": 0, "max_retries": 1,
                              "batch_size": 2, "progress": False, "num_threads": 1, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_synthesis_reads_each_mask_file_once(generator, toy_cohort, tmp_path, monkeypatch):
    import cohort.nifti

    reads: dict[str, int] = {}
    real_load = cohort.nifti._load
    monkeypatch.setattr(cohort.nifti, "_load", lambda p: reads.update({str(p): reads.get(str(p), 0) + 1})
                        or real_load(p))
    synthesize_cohort(generator, toy_cohort, tmp_path / "out", _config(count=8))  # 6 masks, 2 used twice
    df = load_manifest(toy_cohort)
    labels = {str(case_files(toy_cohort, r).label) for _, r in df[df["split"] == "train"].iterrows()}
    assert reads == {p: 1 for p in labels}


def test_an_interrupted_synthesis_keeps_the_first_batch_and_resumes_to_the_same_bytes(generator, toy_cohort,
                                                                                     tmp_path, monkeypatch):
    import synth.synthesize as S

    whole = tmp_path / "whole"
    synthesize_cohort(generator, toy_cohort, whole, _config())
    real_sample = S.sample

    def fail_in_second_batch(*args, **kw):
        if case_seed(0, 2, 0) in args[5]:  # the seeds of the second batch's first draw
            raise RuntimeError("killed while sampling the second batch")
        return real_sample(*args, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(S, "sample", fail_in_second_batch)
    with pytest.raises(RuntimeError, match="second batch"):
        synthesize_cohort(generator, toy_cohort, out, _config())
    first = load_manifest(out / "data_manifest.csv")
    assert first["case_id"].tolist() == ["syn00000_toy_000", "syn00001_toy_001"]
    assert (out / "data_manifest.csv").read_bytes() == _manifest_of_first(whole, 2)
    monkeypatch.setattr(S, "sample", real_sample)
    synthesize_cohort(generator, toy_cohort, out, _config())
    assert _files(out) == _files(whole)
    assert int(load_manifest(whole / "data_manifest.csv")["attempts"].astype(int).max()) == 2  # redraws happened


def _manifest_of_first(folder: Path, n: int) -> bytes:
    """The bytes of folder's manifest with its first n rows only (header + n lines; no field spans lines)."""
    lines = (folder / "data_manifest.csv").read_bytes().splitlines(keepends=True)
    return b"".join(lines[:n + 1])


def test_gate_and_writes_on_two_threads_give_the_sequential_bytes(generator, toy_cohort, tmp_path, monkeypatch):
    import contextlib

    import synth.synthesize as S

    synthesize_cohort(generator, toy_cohort, tmp_path / "pool", _config(count=4, num_threads=2))
    monkeypatch.setattr(S, "_case_map", lambda: contextlib.nullcontext(map))
    synthesize_cohort(generator, toy_cohort, tmp_path / "sequential", _config(count=4, num_threads=2))
    assert _files(tmp_path / "pool") == _files(tmp_path / "sequential")


def test_a_mask_read_label_refuses_is_named_before_the_first_sample(generator, toy_cohort, tmp_path):
    """A label off an integer by less than the mask check's 1e-3 but more than read_label's tolerance: refused
    with the other masks' problems before anything is sampled (it was refused only when its batch came)."""
    df = load_manifest(toy_cohort)
    lab, aff = read_label(case_files(toy_cohort, df.iloc[0]).label)
    masks = tmp_path / "masks" / "data_manifest.csv"
    from cohort.manifest import append_rows, make_row

    rows = []
    for k, arr in enumerate((lab, lab, np.where(lab == BRAIN, 4.0001, lab).astype(np.float32))):
        p = write_array(tmp_path / "masks" / f"m{k}.nii.gz", arr, aff)
        rows.append(make_row(masks, case_id=f"m{k}", cohort="drawn", source="mask", split="train", images={},
                             label=p, shape=lab.shape, spacing=np.abs(np.diag(aff)[:3])))
    append_rows(masks, rows)
    with pytest.raises(InputError, match="m2.nii.gz: label map has non-integer values"):
        synthesize_cohort(generator, masks, tmp_path / "out", _config(count=3, sources=("mask",)))
    assert not (tmp_path / "out" / "data_manifest.csv").exists()

"""eval: fidelity against held-out real cases (radiomics Fréchet distance beside real-vs-real at the same n) and
memorisation against its own baseline (owner-similarity gap, training masks vs held-out masks)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eval.memorisation import mask_rendering, memorisation_gap, memorisation_table, owner_similarity_gap
from eval.synthesis import (HOLDOUT_POOL, fidelity_from_features, fidelity_table, frechet_distance_low_rank,
                            radiomic_features)
from tests.test_eval_synthesis import _make_synthetic


def _frechet_by_square_roots(x, y):
    """The textbook form with symmetric square roots (eigh): |dmu|^2 + tr Sx + tr Sy - 2 tr (Sx^1/2 Sy Sx^1/2)^1/2."""
    def sqrt_psd(m):
        w, v = np.linalg.eigh((m + m.T) / 2)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    rx = sqrt_psd(sx)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(sx) + np.trace(sy)
                 - 2 * np.trace(sqrt_psd(rx @ sy @ rx)))


@pytest.mark.parametrize("n, d", [(60, 5), (8, 40)])
def test_low_rank_frechet_equals_the_square_root_form(n, d):
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, (n, d)), rng.normal(0.5, 2, (n + 3, d))
    assert frechet_distance_low_rank(x, y) == pytest.approx(_frechet_by_square_roots(x, y), rel=1e-6)
    assert frechet_distance_low_rank(x, x) == pytest.approx(0, abs=1e-9)


def _feature_study(rng, n_masks=8, n_ref=24, d=60, shift=0.0, shrink=1.0):
    """Features of a held-out design: each mask carries a case effect shared by its real image and its sample;
    samples = mask effect + own noise (x shrink) + shift."""
    mask = rng.normal(0, 1, (n_masks, d))
    real = mask + rng.normal(0, 1, (n_masks, d))
    syn = mask + shrink * rng.normal(0, 1, (n_masks, d)) + shift
    ref = rng.normal(0, 1, (n_ref, d)) + rng.normal(0, 1, (n_ref, d))
    return syn, real, ref


def test_fidelity_excess_covers_zero_under_the_null_and_sees_a_shift():
    """A generator that samples like the real data: the excess's 95 % interval covers 0 about as often as nominal;
    samples shifted by one sd in every feature: the interval lies above 0 in most studies; samples with a third of
    the real images' own variation (blur-like, less varied): below 0. (200 simulated null studies: 7.5 % miss.)"""
    rng = np.random.default_rng(1)
    null = [fidelity_from_features(*_feature_study(rng), n_boot=200, seed=k).excess for k in range(100)]
    miss = np.mean([not (lo <= 0 <= hi) for _, lo, hi in null])
    assert miss <= 0.10, miss
    shifted = [fidelity_from_features(*_feature_study(rng, shift=1.0), n_boot=200, seed=k).excess for k in range(20)]
    assert np.mean([lo > 0 for _, lo, _ in shifted]) >= 0.8
    assert all(v > 0 for v, _, _ in shifted)
    flat = [fidelity_from_features(*_feature_study(rng, shrink=0.3), n_boot=200, seed=k).excess for k in range(20)]
    assert np.mean([hi < 0 for _, _, hi in flat]) >= 0.8


def test_radiomic_features_see_blur_and_swapped_contrast(toy_cohort):
    """The feature vector is finite, fixed-length and changes with blur and a modality swap (what a fidelity
    measure must see)."""
    from scipy.ndimage import gaussian_filter

    from eval.synthesis import read_cases

    _, cases = read_cases(toy_cohort, ["toy_000"], progress=False)
    img, lab = cases[0].image.data, cases[0].label_map
    f = radiomic_features(img, lab)
    assert f.ndim == 1 and np.isfinite(f).all() and len(f) == len(radiomic_features(img[[1, 0, 2, 3]], lab))
    blurred = np.stack([gaussian_filter(c, 1.0) for c in img])
    assert not np.allclose(f, radiomic_features(blurred, lab), rtol=0.05)
    assert not np.allclose(f, radiomic_features(img[[2, 1, 0, 3]], lab), rtol=0.05)
    assert np.allclose(f, radiomic_features(3 * img + 1, lab))  # per-channel min-max first: scale-free


def _holdout_pool(tmp_path, toy_cohort, owners, make):
    from cohort.manifest import load_manifest, read_case

    df = load_manifest(toy_cohort).set_index("case_id", drop=False)
    items = []
    for k, cid in enumerate(owners):
        case = read_case(toy_cohort, df.loc[cid])
        items.append((f"{HOLDOUT_POOL}_{k:05d}_{cid}", cid, make(case.image.data, case.label_map, k), case.label_map))
    return _make_synthetic(tmp_path, toy_cohort, items)


def test_fidelity_table_rows_reference_and_paired_fidelity(toy_cohort, tmp_path):
    """Near-copies of the held-out real images: the excess is about 0 and paired MS-SSIM about 1; heavily blurred
    samples: a positive excess and a lower paired MS-SSIM. A reference that overlaps the masks' owners is refused."""
    from scipy.ndimage import gaussian_filter

    owners, reference = ["toy_006", "toy_007", "toy_008"], ["toy_000", "toy_001", "toy_002", "toy_003", "toy_009"]
    rng = np.random.default_rng(0)
    copy = _holdout_pool(tmp_path / "copy", toy_cohort, owners,
                         lambda img, lab, k: img + rng.normal(0, 1e-3, img.shape).astype(np.float32))
    t = fidelity_table(toy_cohort, copy, reference_ids=reference, n_boot=200).set_index("metric")
    assert list(t.index) == ["fidelity_frd", "fidelity_frd_real", "fidelity_frd_excess", "paired_ms_ssim"]
    assert (t["synthetic_id"] == HOLDOUT_POOL).all() and (t.loc[t.index[:3], "n"] == 3).all()
    assert abs(t.loc["fidelity_frd_excess", "value"]) < 0.01 * t.loc["fidelity_frd_real", "value"]
    assert t.loc["paired_ms_ssim", "value"] > 0.99
    blur = _holdout_pool(tmp_path / "blur", toy_cohort, owners,
                         lambda img, lab, k: np.stack([gaussian_filter(c, 2.0) for c in img]).astype(np.float32))
    b = fidelity_table(toy_cohort, blur, reference_ids=reference, n_boot=200).set_index("metric")
    assert b.loc["fidelity_frd_excess", "value"] > 0.2 * b.loc["fidelity_frd_real", "value"]
    assert b.loc["paired_ms_ssim", "value"] < t.loc["paired_ms_ssim", "value"] - 0.05
    with pytest.raises(ValueError, match="disjoint"):
        fidelity_table(toy_cohort, copy, reference_ids=reference + ["toy_006"])


def test_owner_similarity_gap_covers_zero_at_the_nominal_rate_under_the_null():
    """Per-owner similarities of samples on training and held-out masks drawn alike (a generator whose samples do
    not depend on what it trained on; skewed like correlations near 0.7): the Welch interval excludes 0 in about
    5 % of studies (3-7 % over 2000), at the study's 8 vs 8 owners and at 8 vs 3."""
    rng = np.random.default_rng(0)
    for n_train, n_held in ((8, 8), (8, 3)):
        miss = 0
        for _ in range(2000):
            a = 1 - rng.gamma(4, 0.075, n_train)
            b = 1 - rng.gamma(4, 0.075, n_held)
            g = owner_similarity_gap(a, b)
            miss += not (g.ci_low <= 0 <= g.ci_high)
        assert 0.03 <= miss / 2000 <= 0.07, (n_train, n_held, miss / 2000)


def test_planted_copy_gives_a_significant_gap_a_faithful_generator_none(toy_cohort, tmp_path):
    """A 'generator' that returns its training image on a training mask (and only renders held-out masks):
    memorisation_gap's interval lies above 0. One that renders every mask the same way (no memory): the gap's
    interval covers 0."""
    from cohort.manifest import load_manifest, read_case

    df = load_manifest(toy_cohort).set_index("case_id", drop=False)
    train, held = ["toy_000", "toy_001", "toy_002", "toy_003"], ["toy_006", "toy_007", "toy_008", "toy_009"]
    rng = np.random.default_rng(3)

    def render(img, lab):  # what a mask alone predicts, plus new noise: no patient detail beyond the mask
        return mask_rendering(lab, img, lab) + rng.normal(0, 0.3, img.shape).astype(np.float32)

    def table(sid, owners, make):
        items = []
        for cid in owners:
            c = read_case(toy_cohort, df.loc[cid])
            items.append((f"{sid}_{cid}", cid, make(c.image.data, c.label_map), c.label_map))
        man = _make_synthetic(tmp_path / sid, toy_cohort, items)
        return memorisation_table(toy_cohort, man, synthetic_id=sid, train_ids=train, progress=False)

    held_t = table(HOLDOUT_POOL, held, render)
    copies = table("copies", train, lambda img, lab: img + rng.normal(0, 0.01, img.shape).astype(np.float32))
    faithful = table("faithful", train, render)
    gap = memorisation_gap(pd.concat([copies, faithful, held_t]), HOLDOUT_POOL).set_index("synthetic_id")
    assert list(gap.index) == ["copies", "faithful"] and (gap["n_owners_heldout"] == 4).all()
    assert gap.loc["copies", "ci_low"] > 0 and gap.loc["copies", "p_value"] < 0.05
    assert gap.loc["faithful", "ci_low"] <= 0 <= gap.loc["faithful", "ci_high"]
    # samples of one owner are averaged first: two samples per training mask are still 4 owners
    assert memorisation_gap(pd.concat([copies, copies.assign(case_id=copies["case_id"] + "b"), held_t]),
                            HOLDOUT_POOL)["n_owners_training"].iloc[0] == 4
    assert memorisation_gap(copies, HOLDOUT_POOL).empty  # no held-out samples: no baseline, no figure

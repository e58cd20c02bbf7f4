"""eval: segmentation metrics, statistics, synthesis quality and memorisation on hand-made volumes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from eval.segmentation import dice_hd95, evaluate_predictions, image_diagonal_mm, region_dice, region_scores
from eval.stats import (VarianceComponents, aggregate, bootstrap_ci, case_seed_interval, holm, label_families,
                        min_detectable_delta, paired_vs_real, ratio_interval, variance_components,
                        with_mean_region)


def _box(shape, lo, hi):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return m


# ---------------------------------------------------------------- Dice / HD95

def test_perfect_overlap_and_disjoint():
    a = _box((16, 20, 16), (2, 2, 2), (8, 8, 8))
    b = _box((16, 20, 16), (10, 12, 10), (14, 18, 14))
    dice, hd = dice_hd95(np.stack([a, a]), np.stack([a, b]), (1.0, 1.0, 1.0))
    assert dice[0] == pytest.approx(1.0) and hd[0] == pytest.approx(0.0)
    assert dice[1] == pytest.approx(0.0) and hd[1] > 5


def test_known_partial_overlap_exact_dice():
    # 4x4x4 cube vs the same cube shifted by one voxel: overlap 3*4*4 = 48, Dice = 2*48/(64+64) = 0.75
    a = _box((16, 20, 16), (4, 4, 4), (8, 8, 8))
    b = _box((16, 20, 16), (5, 4, 4), (9, 8, 8))
    dice, _ = dice_hd95(a[None], b[None], (1.0, 1.0, 1.0))
    assert dice[0] == pytest.approx(0.75)
    # asymmetric sizes: 2x4x4 inside 4x4x4 -> 2*32/(32+64)
    c = _box((16, 20, 16), (4, 4, 4), (6, 8, 8))
    dice, _ = dice_hd95(c[None], a[None], (1.0, 1.0, 1.0))
    assert dice[0] == pytest.approx(2 * 32 / 96)


@pytest.mark.parametrize("axis,spacing", [(0, (2.0, 3.0, 5.0)), (1, (2.0, 3.0, 5.0)), (2, (2.0, 3.0, 5.0))])
def test_hd95_of_known_shift_in_mm(axis, spacing):
    shift = 2
    a = _box((24, 24, 24), (6, 6, 6), (14, 14, 14))
    b = np.roll(a, shift, axis=axis)
    _, hd = dice_hd95(a[None], b[None], spacing)
    assert hd[0] == pytest.approx(shift * spacing[axis])


def test_empty_conventions():
    shape, spacing = (16, 20, 16), (9.0, 9.0, 9.0)
    empty = np.zeros(shape, bool)
    full = _box(shape, (4, 4, 4), (8, 8, 8))
    dice, hd = dice_hd95(np.stack([empty, full, empty]), np.stack([empty, empty, full]), spacing)
    assert dice.tolist() == [1.0, 0.0, 0.0]
    diag = image_diagonal_mm(shape, spacing)
    assert diag == pytest.approx(np.sqrt((16 * 9) ** 2 + (20 * 9) ** 2 + (16 * 9) ** 2))
    assert hd.tolist() == pytest.approx([0.0, diag, diag])
    # BraTS' 373.13 mm is the diagonal of its 240x240x155 1-mm grid
    assert image_diagonal_mm((240, 240, 155), (1, 1, 1)) == pytest.approx(373.13, abs=0.01)


def test_region_scores_use_brats_regions():
    lab = np.zeros((16, 20, 16), np.uint8)
    lab[4:12, 4:12, 4:12] = 2          # ED
    lab[6:10, 6:10, 6:10] = 3          # ET
    lab[7:9, 7:9, 7:9] = 1             # NCR
    pred = lab.copy()
    pred[pred == 1] = 3                # NCR predicted as ET: WT and TC perfect, ET not
    s = region_scores(pred, lab, (1, 1, 1)).set_index("region")
    assert list(s.index) == ["WT", "TC", "ET"]
    assert s.loc["WT", "dice"] == pytest.approx(1.0) and s.loc["TC", "dice"] == pytest.approx(1.0)
    assert s.loc["ET", "dice"] == pytest.approx(2 * 56 / (64 + 56))
    # the Dice-only path (model selection) gives the same numbers, including the empty-region rule
    np.testing.assert_allclose(region_dice(pred, lab), s["dice"].to_numpy())
    no_et = np.where(lab == 3, 2, lab)
    assert region_dice(no_et, no_et).tolist() == [1.0, 1.0, 1.0]   # ET empty in both: 1
    assert region_dice(pred, no_et)[2] == 0.0                      # ET only predicted: 0


def test_evaluate_predictions_reads_manifest(toy_cohort, tmp_path):
    from cohort.manifest import case_files, load_manifest
    from cohort.nifti import read_label, write_array

    df = load_manifest(toy_cohort)
    preds = {}
    for _, row in df.iloc[:3].iterrows():
        lab, aff = read_label(case_files(toy_cohort, row).label)
        if row["case_id"] == "toy_001":
            lab = np.where(lab == 4, 4, 0).astype(np.uint8)   # missed the whole tumour
        if row["case_id"] == "toy_002":
            lab = np.roll(lab, 1, axis=0)                    # off by one 9-mm voxel
        preds[row["case_id"]] = write_array(tmp_path / f"{row['case_id']}.nii.gz", lab, aff)
    out = evaluate_predictions(preds, toy_cohort, progress=False)
    assert list(out.columns) == ["case_id", "region", "dice", "hd95"] and len(out) == 9
    shifted = out[out["case_id"] == "toy_002"]
    assert (shifted["dice"] < 1).all()
    assert np.allclose(shifted["hd95"], 9.0)                  # in mm: the truth's 9-mm spacing, not voxels
    ok = out[out["case_id"] == "toy_000"]
    assert (ok["dice"] == 1.0).all() and (ok["hd95"] == 0.0).all()
    miss = out[out["case_id"] == "toy_001"]
    assert (miss["dice"] == 0.0).all()
    assert miss["hd95"].tolist() == pytest.approx([image_diagonal_mm((16, 20, 16), (9, 9, 9))] * 3)


def test_evaluate_predictions_errors_name_files(toy_cohort, tmp_path):
    from core.errors import InputError
    from cohort.nifti import write_array

    bad = write_array(tmp_path / "bad.nii.gz", np.zeros((8, 8, 8), np.uint8), np.eye(4))
    with pytest.raises(InputError, match="bad.nii.gz.*shape"):
        evaluate_predictions({"toy_000": bad}, toy_cohort, progress=False)
    with pytest.raises(InputError, match="not in the manifest"):
        evaluate_predictions({"nope": bad}, toy_cohort, progress=False)
    with pytest.raises(InputError, match="no prediction"):
        evaluate_predictions({}, toy_cohort, case_ids=["toy_000"], progress=False)


# ---------------------------------------------------------------- statistics

def test_bootstrap_ci_centre_and_coverage():
    rng = np.random.default_rng(1)
    x = rng.normal(0.7, 0.1, 200)
    lo, hi = bootstrap_ci(x, seed=0)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * 0.1 / np.sqrt(200), rel=0.25)
    assert bootstrap_ci(x, seed=0) == bootstrap_ci(x, seed=0)          # seeded
    # coverage of the true mean over repeated samples of 30 is near 95 %
    hits = 0
    for k in range(100):
        s = rng.normal(0.5, 0.2, 30)
        lo, hi = bootstrap_ci(s, seed=k, n_resamples=500)
        hits += lo <= 0.5 <= hi
    assert 85 <= hits <= 100
    assert bootstrap_ci([0.9, 0.9, 0.9]) == (0.9, 0.9)
    assert all(np.isnan(bootstrap_ci([0.5])))


def test_case_seed_interval_with_one_seed_is_the_t_interval_over_cases():
    from scipy.stats import t

    rng = np.random.default_rng(2)
    x = rng.normal(0.7, 0.1, 60)
    ci = case_seed_interval([x[:, None]])
    half = t.ppf(0.975, 59) * x.std(ddof=1) / np.sqrt(60)
    assert (ci.low, ci.high) == pytest.approx((x.mean() - half, x.mean() + half))
    assert ci.df == pytest.approx(59)


def _study_with_seed_noise(rng, effect, seed_sd, n_cases=12, n_seeds=3):
    """Cases × seeds Dice of a reference and a mix: shared case difficulty, one offset per trained segmenter
    (seed_sd: training noise that shifts every test case), small case × seed noise."""
    base = rng.uniform(0.5, 0.9, n_cases)[:, None]
    ref = base + rng.normal(0, seed_sd, (1, n_seeds)) + rng.normal(0, 0.02, (n_cases, n_seeds))
    mix = base + effect + rng.normal(0, seed_sd, (1, n_seeds)) + rng.normal(0, 0.02, (n_cases, n_seeds))
    return mix, ref


def test_paired_interval_counts_segmenter_seed_noise():
    """With training noise and no true effect, an interval over test cases alone calls most differences
    significant (the trained segmenters are treated as fixed); the seed component keeps that near the nominal 5 %
    (tests/test_eval_calibration.py checks it over a grid). A true effect well above the seed noise stays
    significant."""
    rng = np.random.default_rng(0)
    false_case_only = false_case_seed = 0
    for r in range(200):
        mix, ref = _study_with_seed_noise(rng, 0.0, 0.05)
        d = mix.mean(1) - ref.mean(1)
        lo, hi = bootstrap_ci(d, seed=r, n_resamples=500)
        false_case_only += lo > 0 or hi < 0
        ci = case_seed_interval([mix, ref], (1, -1))
        false_case_seed += ci.low > 0 or ci.high < 0
    assert false_case_only >= 120 and false_case_seed <= 20
    mix, ref = _study_with_seed_noise(rng, 0.3, 0.05)
    assert case_seed_interval([mix, ref], (1, -1)).low > 0


def test_paired_vs_real_counts_each_mix_seeds():
    """The per_case.csv route: one real-only seed far below the others must widen the CI of every Δ against it."""
    rng = np.random.default_rng(4)
    rows = []
    for mix, n_r, n_s, offsets in (("1:0", 8, 0, (-0.15, 0.0, 0.03)), ("0:1", 0, 8, (0.0, 0.0, 0.0))):
        for seed, off in enumerate(offsets):
            for c in range(12):
                rows.append({"run": f"{mix}-s{seed}", "mix": mix, "n_real": n_r, "n_synth": n_s, "backend": "monai",
                             "seed": seed, "test_set": "test", "case_id": f"c{c}", "region": "WT",
                             "dice": 0.6 + 0.02 * c + off + rng.normal(0, 0.005), "hd95": 1.0})
    per_case = pd.DataFrame(rows)
    pv = paired_vs_real(per_case).iloc[0]
    assert pv["delta_mean"] == pytest.approx(0.04, abs=0.005)
    # over cases alone the +0.04 is tight (±0.005); with the real-only seeds' spread the interval reaches below 0
    assert pv["delta_ci_low"] <= 0.0 < pv["delta_ci_high"] and pv["p_value"] > 0.05
    assert pv["n_seeds"] == 3 and pv["n_seeds_reference"] == 3 and pv["delta_df"] < 4
    agg = aggregate(per_case).set_index("mix")
    assert agg.loc["1:0", "dice_ci_high"] - agg.loc["1:0", "dice_ci_low"] > \
        agg.loc["0:1", "dice_ci_high"] - agg.loc["0:1", "dice_ci_low"] + 0.05


def _fake_per_case(rng, effects):
    rows = []
    base = rng.uniform(0.5, 0.8, 20)          # per-case difficulty shared by all mixes (pairing matters)
    for mix, (n_real, n_synth, eff) in effects.items():
        for seed in (0, 1):
            for i, b in enumerate(base):
                for region in ("WT", "TC", "ET"):
                    rows.append({"run": f"{mix}-s{seed}", "mix": mix, "n_real": n_real, "n_synth": n_synth,
                                 "backend": "monai", "seed": seed, "test_set": "default", "case_id": f"c{i:02d}",
                                 "region": region, "dice": float(np.clip(b + eff + rng.normal(0, 0.01), 0, 1)),
                                 "hd95": 10.0 - 10 * eff})
    return pd.DataFrame(rows)


def test_aggregate_and_paired_difference_sign():
    rng = np.random.default_rng(0)
    per_case = _fake_per_case(rng, {"1:1": (10, 10, +0.05), "real": (10, 0, 0.0), "synth": (0, 10, -0.1)})
    agg = aggregate(per_case)
    assert agg["mix"].drop_duplicates().tolist() == ["real", "synth", "1:1"]     # paper order
    wt = agg[agg["region"] == "WT"].set_index("mix")
    assert wt.loc["real", "n_cases"] == 20 and wt.loc["real", "n_seeds"] == 2
    assert wt.loc["real", "dice_ci_low"] < wt.loc["real", "dice_mean"] < wt.loc["real", "dice_ci_high"]
    pv = paired_vs_real(per_case)
    pv = pv[pv["region"] == "WT"].set_index("mix")
    assert set(pv.index) == {"1:1", "synth"}
    assert pv.loc["1:1", "delta_mean"] == pytest.approx(0.05, abs=0.01) and pv.loc["1:1", "delta_ci_low"] > 0
    assert pv.loc["synth", "delta_mean"] == pytest.approx(-0.1, abs=0.01) and pv.loc["synth", "delta_ci_high"] < 0
    assert pv.loc["1:1", "frac_improved"] > 0.9 and pv.loc["1:1", "reference_mix"] == "real"
    # pairing by case: the between-case spread (sd ~0.09) would swamp 0.05 unpaired, paired CI is tight
    assert pv.loc["1:1", "delta_ci_high"] - pv.loc["1:1", "delta_ci_low"] < 0.02


def test_holm_adjusts_step_down():
    # sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max 0.02, 0.03, 0.06, 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.5, np.nan, 0.4])
    assert np.isnan(out[1]) and out[[0, 2]] == pytest.approx([0.8, 0.8])   # NaN not counted: m = 2


def test_primary_family_and_holm_within_each_family():
    rng = np.random.default_rng(5)
    per_case = with_mean_region(_fake_per_case(rng, {"real": (10, 0, 0.0), "1:1": (10, 10, 0.02),
                                                     "synth": (0, 10, -0.1)}))
    mean_rows = per_case[per_case["region"] == "mean"]
    assert len(mean_rows) == 3 * 2 * 20                      # one per run and test case
    one = per_case[(per_case["run"] == "1:1-s0") & (per_case["case_id"] == "c03")].set_index("region")["dice"]
    assert one["mean"] == pytest.approx(one[["WT", "TC", "ET"]].mean())
    fam = label_families(paired_vs_real(per_case), primary_region="mean", primary_test_set="default")
    primary = fam[fam["family"] == "primary"]
    assert sorted(primary["mix"]) == ["1:1", "synth"] and set(primary["region"]) == {"mean"}
    assert (fam["family"] == "secondary").sum() == 6
    sec = fam[fam["family"] == "secondary"]
    assert sec["p_holm"].to_numpy() == pytest.approx(holm(sec["p_value"].to_numpy()))
    assert (fam["p_holm"] >= fam["p_value"] - 1e-12).all()


def test_ratio_interval_covers_the_true_ratio():
    rng = np.random.default_rng(6)
    hits = 0
    for _ in range(300):
        base = rng.normal(0.7, 0.1, (12, 1))
        real = base + rng.normal(0, 0.05, (1, 3)) + rng.normal(0, 0.05, (12, 3))
        syn = 0.9 * base + rng.normal(0, 0.05, (1, 3)) + rng.normal(0, 0.05, (12, 3))   # true ratio 0.9
        ci = ratio_interval(syn, real)
        hits += ci.low <= 0.9 <= ci.high
    assert 0.91 * 300 <= hits <= 0.99 * 300
    assert np.isnan(ratio_interval(np.ones((3, 2)), np.zeros((3, 2))).estimate)


def test_variance_components_recover_planted_ones_and_give_the_study_mde():
    rng = np.random.default_rng(8)
    n, k, rows = 40, 5, []
    difficulty = rng.normal(0.7, 0.15, n)
    for mix, n_r, n_s in (("1:0", 8, 0), ("1:1", 8, 8)):
        inter = rng.normal(0, 0.08, n)
        for seed in range(k):
            off = rng.normal(0, 0.06)
            for c in range(n):
                rows.append({"run": f"{mix}-s{seed}", "mix": mix, "n_real": n_r, "n_synth": n_s, "backend": "monai",
                             "seed": seed, "test_set": "test", "case_id": f"c{c}", "region": "TC",
                             "dice": difficulty[c] + inter[c] + off + rng.normal(0, 0.05), "hd95": 1.0})
    vc = variance_components(pd.DataFrame(rows)).iloc[0]
    assert vc["n_cases"] == n and vc["n_seeds"] == k
    assert vc["residual_var"] == pytest.approx(0.05 ** 2, rel=0.15)
    assert vc["case_var"] == pytest.approx(2 * 0.08 ** 2, rel=0.6)        # 40 cases: a rough estimate
    assert 0 < vc["seed_var"] < 0.06 ** 2 * 4                              # 5 seeds per mix: rougher still
    # more seeds and cases can only shrink the minimum detectable Δ
    comp = VarianceComponents(0.01, 0.01, 0.01)
    assert min_detectable_delta(comp, 12, 3) > min_detectable_delta(comp, 12, 6) > min_detectable_delta(comp, 50, 6)


def test_variance_components_of_seed_paired_mixes():
    """Seeds that pair up (the same seed numbers in both mixes) whose offsets are mostly shared: the difference
    table's seed component is the unshared part only (2 × 0.02² here, against 0.06² + 0.02² per mix), the paired
    minimum detectable Δ is smaller than the unpaired one; seeds that do not pair up give NaN."""
    rng = np.random.default_rng(12)
    n, k = 40, 8
    difficulty, shared = rng.normal(0.7, 0.15, n), rng.normal(0, 0.06, k)

    def rows_for(seeds):
        rows = []
        for mix, n_r, n_s in (("1:0", 8, 0), ("1:1", 8, 8)):
            inter = rng.normal(0, 0.05, n)
            for j, seed in enumerate(seeds[mix]):
                off = shared[j] + rng.normal(0, 0.02)
                rows += [{"run": f"{mix}-s{seed}", "mix": mix, "n_real": n_r, "n_synth": n_s, "backend": "monai",
                          "seed": seed, "test_set": "test", "case_id": f"c{c}", "region": "TC",
                          "dice": difficulty[c] + inter[c] + off + rng.normal(0, 0.03), "hd95": 1.0}
                         for c in range(n)]
        return pd.DataFrame(rows)

    vc = variance_components(rows_for({"1:0": range(k), "1:1": range(k)})).iloc[0]
    assert vc["seed_diff_var"] < 0.5 * vc["seed_var"] and vc["seed_diff_var"] < 4 * 2 * 0.02 ** 2
    assert vc["residual_diff_var"] == pytest.approx(2 * 0.03 ** 2, rel=0.2)
    comp = VarianceComponents(vc["case_var"], vc["seed_var"], vc["residual_var"], vc["seed_diff_var"],
                              vc["residual_diff_var"])
    assert min_detectable_delta(comp, 12, 3) < 0.8 * min_detectable_delta(comp, 12, 3, paired=False)
    unpaired = rows_for({"1:0": range(k), "1:1": range(k, 2 * k)})
    other = variance_components(unpaired).iloc[0]
    assert np.isnan(other["seed_diff_var"]) and np.isnan(other["residual_diff_var"])
    assert list(paired_vs_real(unpaired)["seeds_paired"]) == [False]
    assert list(paired_vs_real(rows_for({"1:0": range(k), "1:1": range(k)}))["seeds_paired"]) == [True]

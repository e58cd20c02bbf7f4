"""eval: MS-SSIM diversity, MMD, Fréchet distance, semantic consistency and memorisation."""
from __future__ import annotations

import numpy as np
import pytest

from eval.memorisation import brain_correlation, copy_threshold, memorisation_table, summarise
from eval.synthesis import (diversity, frechet_distance, mmd, ms_ssim, ms_ssim_settings, synthesis_table)
from tests.conftest import make_toy_case


def _toy_volume(seed, shape=(16, 20, 16)):
    images, label = make_toy_case(np.random.default_rng(seed), shape)
    return np.stack([images[m] for m in ("t1", "t1ce", "t2", "flair")]), label


def test_ms_ssim_settings_valid_for_profiles():
    tiny, demo = ms_ssim_settings((16, 20, 16)), ms_ssim_settings((32, 40, 32))
    assert (tiny.n_scales, tiny.kernel_size) == (3, 3)
    assert (demo.n_scales, demo.kernel_size) == (3, 7)
    assert (ms_ssim_settings((192, 192, 144)).n_scales, ms_ssim_settings((128,) * 3).kernel_size) == (4, 11)
    assert sum(tiny.weights) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ms_ssim_settings((4, 4, 4))


@pytest.mark.parametrize("shape", [(16, 20, 16), (32, 40, 32)])
def test_ms_ssim_identical_is_one_noise_lower(shape):
    v, _ = _toy_volume(0, shape)
    assert ms_ssim(v, v) == pytest.approx(1.0, abs=1e-5)
    noisy = v + np.random.default_rng(1).normal(0, 0.5, v.shape).astype(np.float32)
    pure_noise = np.random.default_rng(2).normal(0, 1, v.shape).astype(np.float32)
    s_noisy, s_noise = ms_ssim(v, noisy), ms_ssim(v, pure_noise)
    assert s_noise < s_noisy < 0.99
    assert s_noise < 0.3


def test_diversity_within_vs_across_groups():
    rng = np.random.default_rng(0)
    bases = [_toy_volume(s)[0] for s in range(2)]
    vols, groups = [], []
    for g, b in enumerate(bases):       # 2 "masks" x 3 "samples": small noise around one base image
        for _ in range(3):
            vols.append(b + rng.normal(0, 0.05, b.shape).astype(np.float32))
            groups.append(f"mask{g}")
    d = diversity(vols, groups, seed=0)
    assert len(d["within"]) == 6 and len(d["across"]) == 9
    assert d["within"].mean() > d["across"].mean()
    assert len(diversity(vols, groups, max_pairs=5)["across"]) == 5


def test_mmd_and_frechet_detect_shift():
    real = [_toy_volume(s)[0] for s in range(6)]
    same = [_toy_volume(s)[0] for s in range(10, 16)]
    shifted = [np.flip(v, axis=1).copy() * 0.2 for v in same]   # different structure and contrast
    assert abs(mmd(real, same)) < mmd(real, shifted)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (200, 4)), rng.normal(0, 1, (200, 4))
    c = rng.normal(2, 1, (200, 4))
    assert frechet_distance(a, b) < 0.5
    assert frechet_distance(a, c) == pytest.approx(16.0, rel=0.25)   # |mu diff|^2 = 4 * 2^2


def _make_synthetic(tmp_path, toy_cohort, items):
    """items: list of (case_id, parent_case_id, image array (C,X,Y,Z), label) -> synthetic manifest path."""
    from cohort.manifest import append_rows, make_row
    from cohort.nifti import write_array

    man = tmp_path / "synthetic" / "data_manifest.csv"
    affine = np.diag([9.0, 9.0, 9.0, 1.0])
    affine[:3, 3] = [-72.0, -90.0, -72.0]
    rows = []
    for cid, parent, img, lab in items:
        paths = {m: write_array(man.parent / cid / f"{cid}_{m}.nii.gz", img[k], affine)
                 for k, m in enumerate(("t1", "t1ce", "t2", "flair"))}
        lp = write_array(man.parent / cid / f"{cid}_seg.nii.gz", lab, affine)
        rows.append(make_row(man, case_id=cid, cohort="toy-synth", source="synthetic", split="train", images=paths,
                             label=lp, shape=lab.shape, spacing=(9, 9, 9), parent_case_id=parent,
                             generator_checkpoint="ckpt", sampler="ddim", steps=10, seed=0))
    append_rows(man, rows)
    return man


def test_memorisation_planted_copy_detected_independent_not(toy_cohort, tmp_path):
    from cohort.manifest import read_case, load_manifest

    df = load_manifest(toy_cohort).set_index("case_id", drop=False)
    case = read_case(toy_cohort, df.loc["toy_002"])
    copy_img, copy_lab = case.image, case.label_map
    rng = np.random.default_rng(5)
    planted = copy_img.data + rng.normal(0, 0.01, copy_img.data.shape).astype(np.float32)  # near-copy
    indep = [_toy_volume(100 + k) for k in range(4)]  # fresh patients from the same distribution
    # a mask-faithful generator without memory: the owner's mask filled with its per-label means, plus new noise
    from eval.memorisation import mask_rendering
    faithful = mask_rendering(copy_lab, copy_img.data, copy_lab) + rng.normal(0, 0.05, planted.shape).astype(np.float32)
    man = _make_synthetic(tmp_path, toy_cohort, [("syn_copy", "toy_002", planted, copy_lab),
                                                 ("syn_faithful", "toy_002", faithful, copy_lab)] +
                          [(f"syn_ind{k}", "toy_003", img, lab) for k, (img, lab) in enumerate(indep)])
    t = memorisation_table(toy_cohort, man, synthetic_id="s1", progress=False)
    syn = t[t["kind"] == "synthetic"].set_index("case_id")
    cal = t[t["kind"] == "calibration"]
    assert len(cal) == 2 and (cal["nn_similarity"] <= cal["threshold"]).all()
    assert syn.loc["syn_copy", "copy_nn"] and syn.loc["syn_copy", "nn_case_id"] == "toy_002"
    assert syn.loc["syn_copy", "nn_similarity"] > 0.99
    assert syn.loc["syn_copy", "owner_case_id"] == "toy_002" and syn.loc["syn_copy", "copy_owner"]
    assert not syn.loc[[f"syn_ind{k}" for k in range(4)], "copy_nn"].any()
    # the copy is more similar to its owner than the painted mask; the mask-faithful sample is not
    assert syn.loc["syn_copy", "above_painted_mask"] and not syn.loc["syn_faithful", "above_painted_mask"]
    assert syn.loc["syn_faithful", "owner_similarity"] < syn.loc["syn_faithful", "mask_similarity"]
    s = summarise(t).iloc[0]
    assert s["n_calibration"] == 2 and s["n_synthetic"] == 6
    assert s["frac_above_painted_mask"] <= 0.5 and "frac_beyond_mask" not in s.index
    # no fraction above the between-patient copy threshold: samples pass it through their mask alone
    assert not [c for c in s.index if c.startswith("frac_copy")]


def test_copy_threshold_rules_and_similarity():
    from eval.memorisation import owner_of

    # synthetic -> edited mask -> real case; a loop or an unknown parent gives None
    assert owner_of("syn1", {"syn1": "mask7", "mask7": "real3"}, {"real3"}) == "real3"
    assert owner_of("syn1", {"syn1": "a", "a": "syn1"}, {"real3"}) is None
    assert copy_threshold([0.1, 0.5, 0.3]) == 0.5
    assert copy_threshold(np.linspace(0, 1, 101), "p99") == pytest.approx(0.99)
    a = np.random.default_rng(0).normal(size=(2, 8, 8, 8))
    brain = np.ones((8, 8, 8), bool)
    assert brain_correlation(a, 3 * a + 1, brain) == pytest.approx(1.0)
    assert brain_correlation(a, -a, brain) == pytest.approx(-1.0)


def test_synthesis_table_rows(toy_cohort, tmp_path):
    from cohort.manifest import read_case, load_manifest

    df = load_manifest(toy_cohort).set_index("case_id", drop=False)
    items, preds = [], {}
    rng = np.random.default_rng(0)
    for parent in ("toy_000", "toy_001"):
        case = read_case(toy_cohort, df.loc[parent])
        img, lab = case.image, case.label_map
        for k in range(2):
            noisy = img.data + rng.normal(0, .05, img.data.shape).astype(np.float32)
            items.append((f"syn_{parent}_{k}", parent, noisy, lab))
    man = _make_synthetic(tmp_path, toy_cohort, items)
    from cohort.manifest import case_files
    for _, row in load_manifest(man).iterrows():     # a perfect "segmenter": predictions = conditioning masks
        preds[row["case_id"]] = case_files(man, row).label
    from eval.synthesis import semantic_consistency, summarise_semantic

    wrong = dict(preds)
    wrong["syn_toy_001_1"] = preds["syn_toy_000_0"]                # one prediction of another mask
    sem = summarise_semantic(semantic_consistency(wrong, man)).set_index("region")
    assert sem.loc["WT", "n"] == 4 and sem.loc["WT", "sampler"] == "ddim" and str(sem.loc["WT", "steps"]) == "10"
    assert 0 < sem.loc["WT", "dice_mean"] < 1 and sem.loc["WT", "dice_ci_low"] <= sem.loc["WT", "dice_mean"]
    feats = lambda v: v.data.reshape(4, -1).mean(1)  # noqa: E731  (a stand-in 4-feature extractor)
    t = synthesis_table(toy_cohort, man, synthetic_id="s1", predictions=preds, feature_fn=feats,
                        feature_extractor="channel means (test)", max_pairs=50)
    m = t.set_index(["metric", "region"])
    assert m.loc[("semantic_dice", "WT"), "value"] == 1.0
    assert m.loc[("ms_ssim_within_mask", ""), "n"] == 2 and m.loc[("ms_ssim_across_masks", ""), "n"] == 4
    assert m.loc[("ms_ssim_within_mask", ""), "value"] > m.loc[("ms_ssim_across_masks", ""), "value"]
    # the caller's extractor, named, against the real cases given; no real-vs-real "floor" of other patients
    assert m.loc[("frechet_distance_train_cases", ""), "feature_extractor"] == "channel means (test)"
    assert (t["feature_extractor"] != "").all()
    assert not {"frechet_distance", "frechet_distance_real_floor"} & set(t["metric"])
    # paired fidelity: each sample against the real image of its own mask (4 pairs), a separate named measure
    assert m.loc[("paired_ms_ssim", ""), "n"] == 4 and m.loc[("paired_ms_ssim", ""), "value"] > 0.8
    with pytest.raises(ValueError, match="feature_extractor"):
        synthesis_table(toy_cohort, man, synthetic_id="s1", feature_fn=feats)

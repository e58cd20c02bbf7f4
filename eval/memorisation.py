"""Memorisation check: is a synthetic image a near-copy of a training image?

Similarity of two cases = mean over channels of the Pearson correlation of voxel intensities inside the brain
(union of both cases' brain masks, label > 0). Pearson is insensitive to each cohort's intensity scaling.
Hand-written (a masked Pearson over a few hundred pairs); no MONAI/scipy function takes a mask.

Copy threshold: calibrated on real data, from each real TEST image's nearest-neighbour similarity to the
TRAIN images (rule "max": the largest such value; "p99": its 99th percentile). A synthetic image whose
nearest training neighbour is more similar than any real unseen patient is to the training set is flagged.

The conditioning mask itself is patient anatomy (brain outline, tumour shape and position): a synthetic
image is expected to resemble the real image that owns its mask, and mask-conditioned synthesis is not
anonymisation. We report that similarity (owner_similarity) separately, beside the part of it the mask alone
explains: mask_similarity = similarity between the owner and a rendering of the synthetic image's mask with the
owner's mean intensity per label (mask_rendering). above_painted_mask flags a sample more similar to its owner than
that painted mask; it is NOT a memorisation signal (it was called beyond_mask): a generator that learnt brain
anatomy reproduces grey/white-matter pattern on any mask, so samples on masks it never saw are above it too.

Memorisation is measured against its own baseline (owner_similarity_gap, memorisation_gap): the owner similarity
of samples on the generator's training masks minus that of samples on held-out masks (masks of real cases the
generator never saw, the study's HOLDOUT_POOL), with a Welch t interval over mask owners. Without memorisation
the two are exchangeable (training and held-out cases are draws from one cohort) and the gap is 0.

Output rows follow MEMORISATION_COLUMNS (results/memorisation.csv, docs/eval.md "Report inputs").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from core.errors import ConfigError

SIMILARITY = "pearson-in-brain"
MEMORISATION_COLUMNS = ("synthetic_id", "kind", "case_id", "nn_case_id", "nn_similarity", "owner_case_id",
                        "owner_similarity", "mask_similarity", "threshold", "threshold_rule", "copy_nn", "copy_owner",
                        "above_painted_mask", "similarity")
ANATOMY_NOTE = ("The conditioning mask is itself patient anatomy (brain outline, tumour shape and position), so "
                "every synthetic image carries the anatomy of the patient who owns its mask. Mask-conditioned "
                "synthesis is not anonymisation.")


def brain_correlation(a: np.ndarray, b: np.ndarray, brain: np.ndarray) -> float:
    """Mean over channels of the Pearson correlation of a and b ((C, X, Y, Z)) inside the boolean brain mask."""
    a = np.asarray(a, dtype=np.float64)[:, brain]
    b = np.asarray(b, dtype=np.float64)[:, brain]
    a = a - a.mean(1, keepdims=True)
    b = b - b.mean(1, keepdims=True)
    den = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    r = np.where(den > 0, (a * b).sum(1) / np.where(den > 0, den, 1), 0.0)
    return float(r.mean())


def similarity_matrix(queries: Sequence[np.ndarray], query_labels: Sequence[np.ndarray],
                      refs: Sequence[np.ndarray], ref_labels: Sequence[np.ndarray], *,
                      progress: bool = True) -> np.ndarray:
    """brain_correlation of every (query, reference) pair, shape (n_queries, n_refs)."""
    out = np.empty((len(queries), len(refs)))
    for i in tqdm(range(len(queries)), desc="nearest neighbours", unit="img", disable=not progress or len(queries) < 8):
        for j in range(len(refs)):
            brain = (np.asarray(query_labels[i]) > 0) | (np.asarray(ref_labels[j]) > 0)
            out[i, j] = brain_correlation(queries[i], refs[j], brain)
    return out


def copy_threshold(calibration_nn: Iterable[float], rule: str = "max") -> float:
    """Threshold from real test-vs-train nearest-neighbour similarities: max ("max") or 99th percentile ("p99")."""
    v = np.asarray(list(calibration_nn), dtype=float)
    if len(v) == 0:
        raise ValueError("no calibration similarities (need at least one real test image)")
    if rule == "max":
        return float(v.max())
    if rule == "p99":
        return float(np.percentile(v, 99))
    raise ConfigError(f"unknown threshold rule {rule!r}; use 'max' or 'p99'")


def owner_of(case_id: str, parents: dict[str, str], real_ids: set[str], max_depth: int = 5) -> str | None:
    """Follow parent_case_id links (synthetic -> edited mask -> real case) to the real case owning the mask.

    Used when a synthetic row has no origin_case_id (synth.synthesize writes it; other generators may not)."""
    cur = case_id
    for _ in range(max_depth):
        cur = parents.get(cur)
        if cur is None:
            return None
        if cur in real_ids:
            return cur
    return None


def memorisation_table(real_manifest: str | Path, synthetic_manifest: str | Path, *, synthetic_id: str,
                       train_ids: Iterable[str] | None = None, test_ids: Iterable[str] | None = None,
                       masks_manifest: str | Path | None = None, rule: str = "max",
                       progress: bool = True) -> pd.DataFrame:
    """Nearest-neighbour similarity of each synthetic image to every training image and to its mask's owner.

    train_ids / test_ids: the real images the generator trained on and held-out real images for calibration
    (defaults: real rows with split train / split test). masks_manifest: where edited masks live, so an edited
    mask's parent (the real owner) can be found. Returns MEMORISATION_COLUMNS rows: kind "calibration" for each
    real test image (its NN among train images), kind "synthetic" for each synthetic image.
    """
    from cohort.manifest import load_manifest

    from .synthesis import read_cases

    tr_rows, tr_cases = read_cases(real_manifest, train_ids, source="real",
                                   split=None if train_ids is not None else "train", progress=progress)
    te_rows, te_cases = read_cases(real_manifest, test_ids, source="real",
                                   split=None if test_ids is not None else "test", progress=progress)
    sy_rows, sy_cases = read_cases(synthetic_manifest, source="synthetic", progress=progress)
    tr_data, tr_labs = [c.image.data for c in tr_cases], [c.label_map for c in tr_cases]
    sy_labs = [c.label_map for c in sy_cases]
    cal = similarity_matrix([c.image.data for c in te_cases], [c.label_map for c in te_cases], tr_data, tr_labs,
                            progress=progress)
    cal_nn = cal.max(1)
    thr = copy_threshold(cal_nn, rule)
    syn = similarity_matrix([c.image.data for c in sy_cases], sy_labs, tr_data, tr_labs, progress=progress)

    parents = {}
    for m in [synthetic_manifest] + ([masks_manifest] if masks_manifest else []):
        df = load_manifest(m)
        parents.update({str(c): str(p) for c, p in zip(df["case_id"], df["parent_case_id"]) if not pd.isna(p)})
    # synth.synthesize also records origin_case_id (the real case at the root of the mask's history)
    syn_df = load_manifest(synthetic_manifest)
    origins = ({str(c): str(o) for c, o in zip(syn_df["case_id"], syn_df["origin_case_id"]) if not pd.isna(o)}
               if "origin_case_id" in syn_df.columns else {})
    real_df = load_manifest(real_manifest)
    real_ids = set(real_df["case_id"][real_df["source"] == "real"].astype(str))
    train_index = {cid: j for j, cid in enumerate(tr_rows["case_id"].astype(str))}

    rows = []
    for i, cid in enumerate(te_rows["case_id"].astype(str)):
        j = int(cal[i].argmax())
        rows.append({"synthetic_id": synthetic_id, "kind": "calibration", "case_id": cid,
                     "nn_case_id": tr_rows["case_id"].iloc[j], "nn_similarity": float(cal[i, j]),
                     "owner_case_id": "", "owner_similarity": float("nan"), "mask_similarity": float("nan"),
                     "threshold": thr, "threshold_rule": rule, "copy_nn": bool(cal[i, j] > thr), "copy_owner": False,
                     "above_painted_mask": False, "similarity": SIMILARITY})
    # the real images owning the masks: training images are in memory, others (e.g. val cases) are read
    owner_ids = {cid: (origins.get(cid) if origins.get(cid) in real_ids else owner_of(cid, parents, real_ids))
                 for cid in sy_rows["case_id"].astype(str)}
    owners = {cid: (tr_data[j], tr_labs[j]) for cid, j in train_index.items()}
    extra = sorted({o for o in owner_ids.values() if o is not None and o not in owners})
    if extra:
        _, ex_cases = read_cases(real_manifest, extra, progress=False)
        owners.update({o: (c.image.data, c.label_map) for o, c in zip(extra, ex_cases)})
    for i, cid in enumerate(sy_rows["case_id"].astype(str)):
        j = int(syn[i].argmax())
        owner = owner_ids[cid]
        osim = msim = float("nan")
        if owner is not None:
            o_img, o_lab = owners[owner]
            brain = (sy_labs[i] > 0) | (o_lab > 0)
            osim = float(syn[i, train_index[owner]]) if owner in train_index else \
                brain_correlation(sy_cases[i].image.data, o_img, brain)
            msim = brain_correlation(mask_rendering(sy_labs[i], o_img, o_lab), o_img, brain)
        rows.append({"synthetic_id": synthetic_id, "kind": "synthetic", "case_id": cid,
                     "nn_case_id": tr_rows["case_id"].iloc[j], "nn_similarity": float(syn[i, j]),
                     "owner_case_id": owner or "", "owner_similarity": osim, "mask_similarity": msim,
                     "threshold": thr, "threshold_rule": rule, "copy_nn": bool(syn[i, j] > thr),
                     "copy_owner": bool(osim > thr), "above_painted_mask": bool(osim > msim), "similarity": SIMILARITY})
    return pd.DataFrame(rows, columns=list(MEMORISATION_COLUMNS))


def mask_rendering(mask: np.ndarray, owner_image: np.ndarray, owner_label: np.ndarray) -> np.ndarray:
    """The owner's image as far as a mask can predict it: each label of ``mask`` filled with the owner's mean
    intensity for that label (per channel). Its similarity to the owner is the part of a synthetic image's
    similarity that the mask alone explains (mask_similarity)."""
    out = np.zeros_like(owner_image, dtype=np.float32)
    brain = owner_label > 0
    for v in np.unique(mask):
        src = owner_label == v
        if not src.any():
            src = brain if v > 0 and brain.any() else owner_label == 0
        out[:, mask == v] = owner_image[:, src].mean(axis=1)[:, None]
    return out


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """One row per synthetic cohort: threshold, calibration size, similarity quantiles. The fractions of samples
    above the copy threshold are left out: the threshold is calibrated between different patients, and a sample
    resembles its mask's owner through the mask alone (every sample of the default study lies above it, also on
    held-out masks), so the fraction says nothing about copying; memorisation_gap is the measure."""
    rows = []
    for sid, g in table.groupby("synthetic_id", sort=False):
        cal = g[g["kind"] == "calibration"]
        syn = g[g["kind"] == "synthetic"]
        own = syn["owner_similarity"].astype(float)
        rows.append({"synthetic_id": sid, "similarity": g["similarity"].iloc[0],
                     "threshold_rule": g["threshold_rule"].iloc[0], "threshold": float(g["threshold"].iloc[0]),
                     "n_calibration": len(cal), "n_synthetic": len(syn),
                     "nn_similarity_median": float(syn["nn_similarity"].median()) if len(syn) else float("nan"),
                     "nn_similarity_max": float(syn["nn_similarity"].max()) if len(syn) else float("nan"),
                     "owner_similarity_median": float(own.median()) if own.notna().any() else float("nan"),
                     "mask_similarity_median": float(syn["mask_similarity"].astype(float).median())
                     if own.notna().any() else float("nan"),
                     "frac_above_painted_mask": float(syn.loc[own.notna(), "above_painted_mask"].astype(bool).mean())
                     if own.notna().any() else float("nan")})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class Gap:
    """Owner-similarity gap: mean over training-mask owners minus mean over held-out-mask owners, Welch t interval."""

    gap: float
    ci_low: float
    ci_high: float
    p_value: float
    n_train: int
    n_holdout: int
    train_mean: float
    holdout_mean: float


GAP_METHOD = ("owner-similarity gap = mean over training-mask owners - mean over held-out-mask owners (samples "
              "averaged per owner first); 95 % Welch t interval (scipy.stats.ttest_ind, equal_var=False)")


def owner_similarity_gap(train: Sequence[float], holdout: Sequence[float], confidence: float = 0.95) -> Gap:
    """Gap between two sets of per-owner similarities with a Welch t interval and two-sided p-value; NaN interval
    with fewer than 2 values on a side."""
    from scipy.stats import ttest_ind

    a, b = (np.asarray(v, dtype=float) for v in (train, holdout))
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    gap = float(a.mean() - b.mean()) if len(a) and len(b) else float("nan")
    if min(len(a), len(b)) < 2 or (np.ptp(a) == 0 and np.ptp(b) == 0):
        return Gap(gap, float("nan"), float("nan"), float("nan"), len(a), len(b),
                   float(a.mean()) if len(a) else float("nan"), float(b.mean()) if len(b) else float("nan"))
    res = ttest_ind(a, b, equal_var=False)
    ci = res.confidence_interval(confidence)
    return Gap(gap, float(ci.low), float(ci.high), float(res.pvalue), len(a), len(b), float(a.mean()),
               float(b.mean()))


def per_owner(table: pd.DataFrame, synthetic_id: str) -> pd.Series:
    """Mean owner_similarity per mask owner of one synthetic cohort (samples of one owner are not independent)."""
    g = table[(table["synthetic_id"] == synthetic_id) & (table["kind"] == "synthetic")]
    g = g[g["owner_case_id"].fillna("").astype(str) != ""]
    return g.groupby(g["owner_case_id"].astype(str))["owner_similarity"].mean()


def memorisation_gap(table: pd.DataFrame, holdout_id: str) -> pd.DataFrame:
    """The memorisation figure: per synthetic cohort other than ``holdout_id`` (samples on held-out masks), its
    owner-similarity gap against the held-out samples (owner_similarity_gap). Empty without the held-out cohort.
    A cohort on edited masks compares an edited training mask's sample with the unedited owner, which lowers
    its owner similarity whether or not the generator memorised."""
    if table is None or not len(table) or holdout_id not in set(table["synthetic_id"]):
        return pd.DataFrame()
    held = per_owner(table, holdout_id)
    rows = []
    for sid in dict.fromkeys(table["synthetic_id"]):
        if sid == holdout_id:
            continue
        g = owner_similarity_gap(per_owner(table, sid), held)
        rows.append({"synthetic_id": sid, "owner_similarity_training_masks": g.train_mean,
                     "owner_similarity_heldout_masks": g.holdout_mean, "gap": g.gap, "ci_low": g.ci_low,
                     "ci_high": g.ci_high, "p_value": g.p_value, "n_owners_training": g.n_train,
                     "n_owners_heldout": g.n_holdout})
    return pd.DataFrame(rows)

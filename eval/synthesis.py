"""Quality of a synthetic cohort: semantic consistency, diversity (MS-SSIM), MMD, paired fidelity and fidelity
against held-out real cases (fidelity_table: a radiomics Fréchet distance beside real-vs-real at the same n).

All image metrics use MONAI (MultiScaleSSIMMetric, MMDMetric, FIDMetric). Before MS-SSIM and MMD every
volume is min-max scaled to [0, 1] per channel (data_range 1), the same for real and synthetic images, so
the numbers do not depend on each cohort's intensity normalisation.

synthesis_table's optional Fréchet distance (frechet_distance_train_cases) is computed on features of whatever
3-D network the caller passes (``feature_fn``), against the real cases it is given, with no real-vs-real
reference; the study no longer computes it. Its name is written next to every value: it is NOT the MedicalNet or
RadImageNet FID of the literature. The study's distribution-level fidelity is fidelity_table (below).

Output rows follow SYNTHESIS_COLUMNS (the results/synthesis.csv format, docs/eval.md "Report inputs").
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cohort.case import Case
from core.errors import InputError
from cohort.volume import Volume

SYNTHESIS_COLUMNS = ("synthetic_id", "metric", "region", "value", "sd", "ci_low", "ci_high", "n", "reference",
                     "feature_extractor", "settings")
VOXELS = "none (voxel intensities)"

# the standard 5-scale MS-SSIM weights (Wang et al. 2003), truncated and renormalised for small volumes
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


@dataclass(frozen=True)
class MSSSIMSettings:
    kernel_size: int
    kernel_sigma: float
    weights: tuple[float, ...]

    @property
    def n_scales(self) -> int:
        return len(self.weights)

    def describe(self) -> str:
        return (f"MONAI MultiScaleSSIMMetric, gaussian kernel {self.kernel_size} sigma {self.kernel_sigma:.3g}, "
                f"{self.n_scales} scales, weights {tuple(round(w, 4) for w in self.weights)}, "
                f"per-channel min-max to [0,1]")


def ms_ssim_settings(shape: Sequence[int]) -> MSSSIMSettings:
    """The largest valid MS-SSIM protocol for a grid: as many scales (≤5) and as wide a kernel (≤11) as fit.

    MONAI requires ``min(shape) // (n_scales - 1)**2 > kernel_size - 1``; we also require the coarsest scale
    (min(shape) / 2**(n_scales-1)) to be at least one kernel wide. Results: tiny 16x20x16 -> 3 scales,
    kernel 3; demo 32x40x32 -> 3 scales, kernel 7; paper grids (min side 128 or 144) -> 4 scales, kernel 11.
    sigma = 1.5 * k / 11
    (the standard 11/1.5 ratio).
    """
    m = int(min(shape))
    for n, k in ((5, 11), (4, 11), (4, 7), (3, 7), (3, 5), (3, 3), (2, 3)):
        if m // max(1, n - 1) ** 2 > k - 1 and m / 2 ** (n - 1) >= k:
            w = np.asarray(MS_SSIM_WEIGHTS[:n])
            return MSSSIMSettings(k, 1.5 * k / 11, tuple(float(x) for x in w / w.sum()))
    raise ValueError(f"volume shape {tuple(shape)} is too small for MS-SSIM (min side {m} < 6)")


def unit_range(data: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) -> float32 with each channel min-max scaled to [0, 1] (a constant channel becomes 0)."""
    d = np.asarray(data, dtype=np.float32)
    lo = d.reshape(len(d), -1).min(1)[:, None, None, None]
    hi = d.reshape(len(d), -1).max(1)[:, None, None, None]
    return np.ascontiguousarray(np.where(hi > lo, (d - lo) / np.where(hi > lo, hi - lo, 1), 0), dtype=np.float32)


def ms_ssim(a: np.ndarray, b: np.ndarray, settings: MSSSIMSettings | None = None) -> float:
    """MS-SSIM of two (C, X, Y, Z) volumes (mean over channels), after unit_range scaling."""
    return float(pairwise_ms_ssim([a, b], [(0, 1)], settings)[0])


def pairwise_ms_ssim(volumes: Sequence[np.ndarray], pairs: Sequence[tuple[int, int]],
                     settings: MSSSIMSettings | None = None, batch: int = 16) -> np.ndarray:
    """MS-SSIM for each index pair of ``volumes`` (each (C, X, Y, Z)), batched through MONAI."""
    from monai.metrics import MultiScaleSSIMMetric

    if not pairs:
        return np.zeros(0)
    settings = settings or ms_ssim_settings(np.asarray(volumes[0]).shape[1:])
    metric = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=settings.kernel_size,
                                  kernel_sigma=settings.kernel_sigma, weights=settings.weights, reduction="none")
    scaled = [torch.from_numpy(unit_range(v)) for v in volumes]
    out = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            chunk = pairs[s:s + batch]
            x = torch.stack([scaled[i] for i, _ in chunk])
            y = torch.stack([scaled[j] for _, j in chunk])
            out.append(metric(x, y).reshape(-1).numpy())
    return np.concatenate(out).astype(float)


def _sample_pairs(pairs: list[tuple[int, int]], max_pairs: int | None, rng: np.random.Generator):
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    idx = rng.choice(len(pairs), size=max_pairs, replace=False)
    return [pairs[i] for i in sorted(idx)]


def diversity(volumes: Sequence[np.ndarray], groups: Sequence[str] | None = None, *, max_pairs: int | None = 100,
              seed: int = 0, settings: MSSSIMSettings | None = None) -> dict[str, np.ndarray]:
    """Pairwise MS-SSIM within groups (samples of one mask) and across groups (different masks).

    groups: one key per volume (e.g. the conditioning mask id); None = every volume its own group.
    At most ``max_pairs`` pairs of each kind, drawn with ``seed``. Returns {"within": values, "across": values}.
    Lower MS-SSIM = more diverse.
    """
    groups = list(range(len(volumes))) if groups is None else list(groups)
    rng = np.random.default_rng(seed)
    all_pairs = list(itertools.combinations(range(len(volumes)), 2))
    within = _sample_pairs([p for p in all_pairs if groups[p[0]] == groups[p[1]]], max_pairs, rng)
    across = _sample_pairs([p for p in all_pairs if groups[p[0]] != groups[p[1]]], max_pairs, rng)
    return {"within": pairwise_ms_ssim(volumes, within, settings),
            "across": pairwise_ms_ssim(volumes, across, settings)}


def mmd(real: Sequence[np.ndarray], synthetic: Sequence[np.ndarray], *, seed: int = 0) -> float:
    """Unbiased MMD (MONAI MMDMetric, linear kernel on unit_range-scaled voxels) between two image sets.

    Features are divided by sqrt(number of voxels x channels), so the value is a per-voxel squared distance
    between the two sets' mean images (minus within-set terms; it can be slightly negative when sets match).

    MONAI needs equal set sizes: the larger set is subsampled (seeded) to the smaller one's size.
    """
    from monai.metrics import MMDMetric

    n = min(len(real), len(synthetic))
    if n < 2:
        raise ValueError(f"MMD needs at least 2 images per set, got {len(real)} real and {len(synthetic)} synthetic")
    rng = np.random.default_rng(seed)
    pick = lambda s: [s[i] for i in sorted(rng.choice(len(s), size=n, replace=False))]  # noqa: E731
    y = torch.from_numpy(np.stack([unit_range(v) for v in pick(real)]))
    y_pred = torch.from_numpy(np.stack([unit_range(v) for v in pick(synthetic)]))
    # scale features by 1/sqrt(voxels) so the value is per voxel and comparable across grid sizes
    per_voxel = lambda t: t / float(np.sqrt(t[0].numel()))  # noqa: E731
    return float(MMDMetric(y_mapping=per_voxel)(y, y_pred))


def frechet_distance(real_features: np.ndarray, synthetic_features: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (n_images, n_features), via MONAI FIDMetric.

    Returns NaN when MONAI refuses (e.g. a large imaginary part from a rank-deficient covariance, which
    happens when there are fewer images than feature dimensions).
    """
    from monai.metrics import FIDMetric

    a = torch.as_tensor(np.asarray(real_features, dtype=np.float64).reshape(len(real_features), -1))
    b = torch.as_tensor(np.asarray(synthetic_features, dtype=np.float64).reshape(len(synthetic_features), -1))
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Fréchet distance needs at least 2 feature vectors per set")
    try:
        return float(FIDMetric()(b, a))
    except ValueError:
        return float("nan")


def read_cases(manifest: str | Path, case_ids: Iterable[str] | None = None, *, source: str | None = None,
               split: str | None = None, progress: bool = True) -> tuple[pd.DataFrame, list[Case]]:
    """Read (rows, cases) of a manifest through cohort (each Case: image and label Volume), optionally filtered."""
    from cohort.manifest import load_manifest, read_case, select

    df = select(load_manifest(manifest), source=source, split=split)
    if case_ids is not None:
        wanted = [str(c) for c in case_ids]
        missing = sorted(set(wanted) - set(df["case_id"]))
        if missing:
            raise InputError(manifest, f"cases {missing} are not in the manifest", kind="missing-case")
        df = df.set_index("case_id", drop=False).loc[wanted]
    cases = [read_case(manifest, row) for _, row in tqdm(df.iterrows(), total=len(df), unit="case",
                                                         desc=f"read {Path(manifest).parent.name}",
                                                         disable=not progress or len(df) < 8)]
    return df.reset_index(drop=True), cases


def mask_key(row: pd.Series) -> str:
    """Identity of the conditioning mask of a synthetic row: parent_case_id plus mask_edit (if any)."""
    edit = row.get("mask_edit")
    edit = "" if edit is None or pd.isna(edit) else str(edit)
    return f"{row.get('parent_case_id')}|{edit}"


def semantic_consistency(predictions: Mapping[str, str | Path], synthetic_manifest: str | Path,
                         case_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Dice/HD95 of a real-only segmenter's predictions on synthetic images against their conditioning masks.

    predictions: {synthetic case_id: predicted label path}, e.g. from segment.api.predict on the synthetic
    manifest. Returns evaluate_predictions' columns plus sampler and steps (to compare samplers).
    """
    from cohort.manifest import load_manifest

    from .segmentation import evaluate_predictions

    scores = evaluate_predictions(predictions, synthetic_manifest, case_ids)
    meta = load_manifest(synthetic_manifest).set_index("case_id")[["sampler", "steps"]]
    return scores.join(meta, on="case_id")


def summarise_semantic(scores: pd.DataFrame, by: Sequence[str] = ("sampler", "steps"), *,
                       seed: int = 0) -> pd.DataFrame:
    """Semantic-consistency Dice per sampler setting and region: mean, sd, bootstrap CI over synthetic cases.

    scores: semantic_consistency output. The table used to compare samplers and step counts.
    """
    from .stats import bootstrap_ci

    rows = []
    for key, g in scores.groupby([*by, "region"], sort=True, dropna=False):
        lo, hi = bootstrap_ci(g["dice"], seed=seed)
        rows.append({**dict(zip([*by, "region"], key)), "n": int(g["dice"].notna().sum()),
                     "dice_mean": float(g["dice"].mean()), "dice_sd": float(g["dice"].std(ddof=1)),
                     "dice_ci_low": lo, "dice_ci_high": hi, "hd95_mean": float(g["hd95"].mean())})
    return pd.DataFrame(rows)


def _row(synthetic_id, metric, values=None, *, value=None, region="", reference="", feature_extractor=VOXELS,
         settings="", seed=0) -> dict:
    from .stats import bootstrap_ci

    if values is not None:
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        value = float(v.mean()) if len(v) else float("nan")
        sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
        lo, hi = bootstrap_ci(v, seed=seed)
        n = len(v)
    else:
        sd = lo = hi = float("nan")
        n = 1
    return {"synthetic_id": synthetic_id, "metric": metric, "region": region, "value": value, "sd": sd,
            "ci_low": lo, "ci_high": hi, "n": n, "reference": reference, "feature_extractor": feature_extractor,
            "settings": settings}


def synthesis_table(real_manifest: str | Path, synthetic_manifest: str | Path, *, synthetic_id: str,
                    real_case_ids: Iterable[str] | None = None, predictions: Mapping[str, str | Path] | None = None,
                    segmenter: str = "real-only segmenter",
                    feature_fn: Callable[[Volume], np.ndarray] | None = None, feature_extractor: str | None = None,
                    max_pairs: int | None = 100, seed: int = 0) -> pd.DataFrame:
    """Every synthesis-quality number of one synthetic cohort as rows of results/synthesis.csv.

    real_case_ids: the real reference set (default: real train cases of real_manifest).
    predictions: a real-only segmenter's predictions on the synthetic images (semantic consistency rows).
    feature_fn: Volume -> 1-D feature vector (e.g. functools.partial(segment.monai_backend.encoder_features,
    model_dir)); feature_extractor: its name, required with feature_fn, written in every Fréchet row.
    """
    if feature_fn is not None and not feature_extractor:
        raise ValueError("feature_extractor (a name for the network producing the features) is required "
                         "with feature_fn")
    _, real_cases = read_cases(real_manifest, real_case_ids, source="real",
                               split=None if real_case_ids is not None else "train")
    syn_rows, syn_cases = read_cases(synthetic_manifest, source="synthetic")
    real_vols, syn_vols = [c.image for c in real_cases], [c.image for c in syn_cases]
    if not syn_vols:
        raise InputError(synthetic_manifest, "no synthetic rows to evaluate", kind="empty")
    shape = syn_vols[0].shape
    settings = ms_ssim_settings(shape)
    rows = []
    if predictions:
        sc = semantic_consistency(predictions, synthetic_manifest)
        samp = ",".join(sorted(set(sc["sampler"].dropna().astype(str))))
        steps = ",".join(sorted(set(sc["steps"].dropna().astype(str))))
        for region, g in sc.groupby("region", sort=False):
            for m in ("dice", "hd95"):
                rows.append(_row(synthetic_id, f"semantic_{m}", g[m], region=region, reference="conditioning masks",
                                 settings=f"segmenter: {segmenter}; sampler {samp}; steps {steps}", seed=seed))
    syn_data = [v.data for v in syn_vols]
    real_data = [v.data for v in real_vols]
    groups = [mask_key(r) for _, r in syn_rows.iterrows()]
    div = diversity(syn_data, groups, max_pairs=max_pairs, seed=seed, settings=settings)
    real_div = diversity(real_data, None, max_pairs=max_pairs, seed=seed, settings=settings)
    s = settings.describe()
    rows.append(_row(synthetic_id, "ms_ssim_within_mask", div["within"], reference="synthetic pairs, same mask",
                     settings=s, seed=seed))
    rows.append(_row(synthetic_id, "ms_ssim_across_masks", div["across"],
                     reference="synthetic pairs, different masks", settings=s, seed=seed))
    rows.append(_row(synthetic_id, "ms_ssim_real", real_div["across"], reference="real pairs (reference)",
                     settings=s, seed=seed))
    if min(len(real_data), len(syn_data)) >= 2:
        rows.append(_row(synthetic_id, "mmd", value=mmd(real_data, syn_data, seed=seed), reference="real images",
                         settings="MONAI MMDMetric, linear kernel, per voxel (features / sqrt(D)), "
                                  "per-channel min-max to [0,1], "
                                  f"n={min(len(real_data), len(syn_data))} per set (seeded subsample)"))
    if feature_fn is not None:
        def features(vols, what):
            return np.stack([np.asarray(feature_fn(v), dtype=np.float64).ravel()
                             for v in tqdm(vols, desc=f"features {what}", disable=len(vols) < 8)])

        fr, fs = features(real_vols, "real"), features(syn_vols, "synthetic")
        note = f"MONAI FIDMetric; {len(fr)} real vs {len(fs)} synthetic, {fr.shape[1]} features"
        if min(len(fr), len(fs)) <= fr.shape[1]:
            note += " (fewer images than features: covariance rank-deficient, value unstable)"
        # no real-vs-real reference is given for it: the reference set is the generator's own training cases
        # (the study's fidelity against a valid reference is fidelity_table, on held-out masks)
        rows.append(_row(synthetic_id, "frechet_distance_train_cases", value=frechet_distance(fr, fs),
                         reference="the real cases of real_case_ids (for a study: the generator's training cases)",
                         feature_extractor=feature_extractor, settings=note))
    paired = paired_fidelity_row(synthetic_id, syn_rows, syn_cases, real_manifest, settings, seed)
    if paired is not None:
        rows.append(paired)
    return pd.DataFrame(rows, columns=list(SYNTHESIS_COLUMNS))


# ------------------------------------------------------------------------------------------ fidelity (held-out)
# Distribution-level fidelity after the Fréchet Radiomics Distance recipe (FRD, Konz, Osuala et al. 2026:
# radiomic features -> z-scored on the reference set -> Fréchet distance of Gaussian fits). The frd-score package
# needs pyradiomics, whose PyPI release does not install on Python >= 3.10 (pyradiomics issue #903), so the
# features are computed here (scipy.ndimage filters, scipy.stats moments, skimage.feature.graycoprops); they
# follow pyradiomics' first-order and GLCM definitions but are not its feature set, and values are not comparable
# with published FRDs. No network is trained on any case, so no study case shaped the features.

HOLDOUT_POOL = "study-holdout-masks"  # the study's pool on held-out masks: fidelity and memorisation only
RADIOMIC_FILTERS = ("original", "log-sigma1", "log-sigma2", "gradient-sigma1")  # sigma in voxels
FIRST_ORDER = ("mean", "sd", "skewness", "kurtosis", "p10", "p25", "median", "p75", "p90", "iqr", "mad",
               "robust_mad", "rms", "entropy", "uniformity", "range_p1_p99")
GLCM_PROPS = ("contrast", "dissimilarity", "homogeneity", "ASM", "correlation", "entropy", "variance")
GLCM_LEVELS = 16
# the 13 unique neighbour offsets of a 3-D 26-neighbourhood (pyradiomics' GLCM directions at distance 1)
_OFFSETS_3D = [d for d in itertools.product((-1, 0, 1), repeat=3) if d > (0, 0, 0)]
RADIOMICS = (f"radiomic features per modality inside the brain (label > 0): first-order {len(FIRST_ORDER)} on "
             f"{', '.join(RADIOMIC_FILTERS)}; GLCM {len(GLCM_PROPS)} ({GLCM_LEVELS} levels on [-1, 1], 13 3-D "
             "directions pooled); each channel min-max scaled to [-1, 1] first; z-scored on the held-out real "
             "reference set (FRD recipe, no training)")


def _first_order(x: np.ndarray, lo: float, hi: float) -> list[float]:
    """pyradiomics-style first-order statistics of the voxel values x (1-D); histogram on the fixed range
    [lo, hi] (32 bins) so that entropy and uniformity compare across images."""
    from scipy.stats import kurtosis, skew

    p = np.percentile(x, [1, 10, 25, 50, 75, 90, 99])
    between = x[(x >= p[1]) & (x <= p[5])]
    hist = np.histogram(np.clip(x, lo, hi), bins=32, range=(lo, hi))[0] / len(x)
    nz = hist[hist > 0]
    return [float(x.mean()), float(x.std(ddof=1)), float(skew(x)), float(kurtosis(x)), p[1], p[2], p[3], p[4], p[5],
            p[4] - p[2], float(np.abs(x - x.mean()).mean()),
            float(np.abs(between - between.mean()).mean()) if len(between) else 0.0, float(np.sqrt((x * x).mean())),
            float(-(nz * np.log2(nz)).sum()), float((hist * hist).sum()), p[6] - p[0]]


def glcm_3d(quantised: np.ndarray, region: np.ndarray, levels: int = GLCM_LEVELS) -> np.ndarray:
    """Symmetric grey-level co-occurrence matrix (levels, levels) of a 3-D image of levels 0..levels-1, pooled over
    the 13 3-D directions at distance 1, counting voxel pairs with both voxels inside ``region``. Hand-written:
    skimage.feature.graycomatrix is 2-D only; its graycoprops then reads the matrix."""
    m = np.zeros((levels, levels), dtype=np.float64)
    shape = np.array(quantised.shape)
    for off in _OFFSETS_3D:
        a = tuple(slice(max(0, -o), s - max(0, o)) for o, s in zip(off, shape))
        b = tuple(slice(max(0, o), s - max(0, -o)) for o, s in zip(off, shape))
        both = region[a] & region[b]
        m += np.bincount(quantised[a][both] * levels + quantised[b][both], minlength=levels * levels).reshape(
            levels, levels)
    return m + m.T


def radiomic_features(image: np.ndarray, label: np.ndarray) -> np.ndarray:
    """One image's radiomic feature vector (RADIOMICS): image (C, X, Y, Z), label (X, Y, Z); features of each
    modality inside the brain (label > 0), in a fixed order. Each channel is first min-max scaled to [-1, 1], the
    generator's training normalisation (synth.data), so real images (stored as imported) and samples share a scale."""
    from scipy import ndimage
    from skimage.feature import graycoprops

    brain = np.asarray(label) > 0
    if brain.sum() < 2:
        brain = np.ones_like(brain, dtype=bool)
    out = []
    for ch in 2.0 * unit_range(image).astype(np.float64) - 1.0:
        filtered = {"original": ch, "log-sigma1": ndimage.gaussian_laplace(ch, 1.0),
                    "log-sigma2": ndimage.gaussian_laplace(ch, 2.0),
                    "gradient-sigma1": ndimage.gaussian_gradient_magnitude(ch, 1.0)}
        for name in RADIOMIC_FILTERS:
            x = filtered[name][brain]
            lo, hi = (-1.0, 1.0) if name == "original" else (float(np.percentile(x, 1)), float(np.percentile(x, 99)))
            out += _first_order(x, lo, max(hi, lo + 1e-6))
        q = np.clip(((ch + 1) / 2 * GLCM_LEVELS).astype(np.int64), 0, GLCM_LEVELS - 1)
        glcm = glcm_3d(q, brain)[:, :, None, None]
        out += [float(graycoprops(glcm, prop)[0, 0]) for prop in GLCM_PROPS]
    return np.asarray(out, dtype=np.float64)


def frechet_distance_low_rank(x: np.ndarray, y: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (n, d), exact when n < d.

    |mu_x - mu_y|^2 + tr S_x + tr S_y - 2 tr (S_x S_y)^(1/2), where tr (S_x S_y)^(1/2) is the sum of the singular
    values of Xc Yc^T / sqrt((n_x - 1)(n_y - 1)) (Xc, Yc: centred data; the non-zero eigenvalues of S_x S_y are
    those of M M^T with M = Xc Yc^T). Hand-written: MONAI's FIDMetric and scipy.linalg.sqrtm take the matrix
    square root of a d x d product, which is ill-conditioned (and complex) for the rank-deficient covariances of a
    few images."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        raise ValueError("the Fréchet distance needs at least 2 feature vectors per set")
    xc, yc = x - x.mean(0), y - y.mean(0)
    a, b = len(x) - 1, len(y) - 1
    cross = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt(a * b)
    mean_term = float(((x.mean(0) - y.mean(0)) ** 2).sum())
    return float(mean_term + (xc * xc).sum() / a + (yc * yc).sum() / b - 2 * cross)


@dataclass(frozen=True)
class Fidelity:
    """Fréchet distances of synthetic images on held-out masks (``synthetic``) and of the real images of those
    same masks (``real``) to a disjoint held-out real reference set, at the same sample sizes; ``excess`` =
    synthetic - real. Each with a percentile bootstrap interval (cases of both sets resampled, the synthetic and
    real images of one mask together)."""

    synthetic: tuple[float, float, float]  # estimate, ci low, ci high
    real: tuple[float, float, float]
    excess: tuple[float, float, float]
    n_masks: int
    n_reference: int
    n_features: int
    n_boot: int


def fidelity_from_features(synthetic: np.ndarray, real_same_masks: np.ndarray, reference: np.ndarray, *,
                           n_boot: int = 1000, confidence: float = 0.95, seed: int = 0) -> Fidelity:
    """Fidelity of synthetic feature vectors against a real reference set, beside real-vs-real at the same n.

    synthetic[i] and real_same_masks[i] belong to the same held-out mask (the synthetic image and the real image
    that owns the mask); reference: other held-out real cases. Features are z-scored with the reference set's mean
    and sd (FRD v1's reference normalisation; features constant or non-finite in any set are dropped) and
    compared with frechet_distance_low_rank."""
    s, r, ref = (np.asarray(v, dtype=np.float64) for v in (synthetic, real_same_masks, reference))
    if len(s) != len(r):
        raise ValueError(f"{len(s)} synthetic but {len(r)} real feature vectors: they must pair by mask")
    if len(s) < 2 or len(ref) < 2:
        raise ValueError("fidelity needs at least 2 masks and 2 reference cases")
    mu, sd = ref.mean(0), ref.std(0, ddof=1)
    keep = np.isfinite(s).all(0) & np.isfinite(r).all(0) & np.isfinite(ref).all(0) & (sd > 1e-12)
    z = lambda v: (v[:, keep] - mu[keep]) / sd[keep]  # noqa: E731
    s, r, ref = z(s), z(r), z(ref)

    def distances(i, j):
        ds, dr = frechet_distance_low_rank(s[i], ref[j]), frechet_distance_low_rank(r[i], ref[j])
        return ds, dr, ds - dr

    est = distances(np.arange(len(s)), np.arange(len(ref)))
    rng = np.random.default_rng(seed)
    boot = np.array([distances(rng.integers(0, len(s), len(s)), rng.integers(0, len(ref), len(ref)))
                     for _ in range(n_boot)])
    # resampling with replacement duplicates cases, which inflates a Fréchet distance (fewer distinct points, same
    # n): the percentile interval is re-centred by the bootstrap's own bias estimate, mean(boot) - estimate
    q = (1 - confidence) / 2
    bias = boot.mean(0) - np.asarray(est)
    lo, hi = np.quantile(boot, q, axis=0) - bias, np.quantile(boot, 1 - q, axis=0) - bias
    trip = lambda k: (float(est[k]), float(lo[k]), float(hi[k]))  # noqa: E731
    return Fidelity(trip(0), trip(1), trip(2), len(s), len(ref), int(keep.sum()), n_boot)


def mask_owner(row: pd.Series) -> str | None:
    """The real case whose image is the 'real image of this mask': origin_case_id (synth.synthesize writes it) or
    parent_case_id, only for an unedited mask (an edited mask has no real image)."""
    edit = row.get("mask_edit")
    if edit is not None and not pd.isna(edit) and str(edit):
        return None
    for col in ("origin_case_id", "parent_case_id"):
        v = row.get(col)
        if v is not None and not pd.isna(v) and str(v):
            return str(v)
    return None


def paired_fidelity_row(synthetic_id: str, syn_rows: pd.DataFrame, syn_cases: Sequence[Case],
                        real_manifest: str | Path, settings: MSSSIMSettings, seed: int = 0) -> dict | None:
    """'paired_ms_ssim': MS-SSIM of each synthetic image with the real image that owns its (unedited) mask, mean
    and bootstrap interval over those pairs; None when no synthetic case has a real owner in ``real_manifest``."""
    from cohort.manifest import load_manifest

    real_ids = set(load_manifest(real_manifest)["case_id"].astype(str))
    pairs = [(k, mask_owner(row)) for k, (_, row) in enumerate(syn_rows.iterrows())]
    pairs = [(k, o) for k, o in pairs if o in real_ids]
    if not pairs:
        return None
    _, owners = read_cases(real_manifest, [o for _, o in pairs], progress=False)
    vols = [syn_cases[k].image.data for k, _ in pairs] + [c.image.data for c in owners]
    values = pairwise_ms_ssim(vols, [(i, len(pairs) + i) for i in range(len(pairs))], settings)
    return _row(synthetic_id, "paired_ms_ssim", values, reference="the real image of the same mask (its owner)",
                settings=settings.describe() + "; paired fidelity: one pair per synthetic image", seed=seed)


def fidelity_table(real_manifest: str | Path, holdout_manifest: str | Path, *, reference_ids: Iterable[str],
                   synthetic_id: str = HOLDOUT_POOL, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """results/synthesis.csv rows of the held-out fidelity of a synthetic pool conditioned on held-out masks.

    holdout_manifest: synthetic images on masks of real cases the generator never saw (unedited; each row's owner
    from mask_owner). reference_ids: other held-out real cases (disjoint from the owners). Rows:
    fidelity_frd (synthetic vs reference), fidelity_frd_real (the owners' real images vs the same reference, at the
    same sample sizes), fidelity_frd_excess (their difference: 0 = as close to real as real is to itself), each
    with a bootstrap interval (fidelity_from_features); paired_ms_ssim (synthetic vs the real image of its mask).
    """
    syn_rows, syn_cases = read_cases(holdout_manifest, source="synthetic", progress=False)
    owners = [mask_owner(r) for _, r in syn_rows.iterrows()]
    if not syn_cases or any(o is None for o in owners):
        raise InputError(holdout_manifest, "every held-out synthetic row needs the real case owning its (unedited) "
                                           "mask (origin_case_id or parent_case_id)", kind="bad-results")
    reference_ids = [str(c) for c in reference_ids]
    overlap = sorted(set(owners) & set(reference_ids))
    if overlap:
        raise ValueError(f"reference cases {overlap} also own held-out masks: the reference must be disjoint")
    _, real_cases = read_cases(real_manifest, owners, progress=False)
    _, ref_cases = read_cases(real_manifest, reference_ids, progress=False)
    feats = lambda cases: np.stack([radiomic_features(c.image.data, c.label_map) for c in cases])  # noqa: E731
    fid = fidelity_from_features(feats(syn_cases), feats(real_cases), feats(ref_cases), n_boot=n_boot, seed=seed)
    note = (f"{fid.n_masks} held-out masks vs {fid.n_reference} other held-out real cases, {fid.n_features} "
            f"features; Fréchet distance (exact low-rank form); 95 % percentile bootstrap over both sets' cases, "
            f"re-centred by its bias ({fid.n_boot} resamples, seed {seed})")
    rows = []
    for metric, (v, lo, hi), ref in (
            ("fidelity_frd", fid.synthetic, "held-out real cases (synthetic on other held-out masks)"),
            ("fidelity_frd_real", fid.real, "held-out real cases (the real images of the same held-out masks)"),
            ("fidelity_frd_excess", fid.excess, "fidelity_frd - fidelity_frd_real (0: as close as real is)")):
        row = _row(synthetic_id, metric, value=v, reference=ref, feature_extractor=RADIOMICS, settings=note)
        rows.append({**row, "ci_low": lo, "ci_high": hi, "n": fid.n_masks})
    settings = ms_ssim_settings(syn_cases[0].image.shape)
    paired = paired_fidelity_row(synthetic_id, syn_rows, syn_cases, real_manifest, settings, seed)
    if paired is not None:
        rows.append(paired)
    return pd.DataFrame(rows, columns=list(SYNTHESIS_COLUMNS))

"""Quality of a synthetic cohort: semantic consistency, diversity (MS-SSIM), MMD and a Fréchet distance.

All image metrics use MONAI (MultiScaleSSIMMetric, MMDMetric, FIDMetric). Before MS-SSIM and MMD every
volume is min-max scaled to [0, 1] per channel (data_range 1), the same for real and synthetic images, so
the numbers do not depend on each cohort's intensity normalisation.

The Fréchet distance is computed on features of whatever 3-D network the caller passes (``feature_fn``) and
its name is written next to every value: it is NOT the MedicalNet or RadImageNet FID of the literature and
values are not comparable with published FIDs.

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


def _disjoint_real_cases(manifest: str | Path, reference_ids: Iterable[str] | None, n: int) -> list[Case]:
    """Up to n real training cases of the manifest that are not in the reference set (sorted by case id)."""
    from cohort.manifest import load_manifest, select

    if reference_ids is None:  # the reference is every real training case: nothing is left to compare with
        return []
    ref = {str(c) for c in reference_ids}
    ids = sorted(c for c in select(load_manifest(manifest), source="real", split="train")["case_id"] if c not in ref)
    return read_cases(manifest, ids[:n], source="real")[1] if ids else []


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
        rows.append(_row(synthetic_id, "frechet_distance", value=frechet_distance(fr, fs), reference="real images",
                         feature_extractor=feature_extractor, settings=note))
        # the floor that makes the number readable: the same distance between the reference real set and as many
        # other real training cases (disjoint from it), same extractor
        floor_cases = _disjoint_real_cases(real_manifest, real_case_ids, len(real_vols))
        if len(floor_cases) >= 2:
            fo = features([c.image for c in floor_cases], "real (disjoint)")
            rows.append(_row(synthetic_id, "frechet_distance_real_floor", value=frechet_distance(fr, fo),
                             reference="other real training cases", feature_extractor=feature_extractor,
                             settings=f"MONAI FIDMetric; {len(fr)} real vs {len(fo)} other real, {fr.shape[1]} "
                                      "features (the value two real sets of this size differ by)"))
    return pd.DataFrame(rows, columns=list(SYNTHESIS_COLUMNS))

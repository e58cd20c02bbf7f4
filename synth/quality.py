"""MAISI-style quality gate for synthetic MRI: statistics of a sample judged against envelopes learnt from the
generator's real training cases (stored beside the generator at training time as intensity_ranges.json).

Checks, per modality unless said otherwise (docs/decisions/0010 and 0014):

1. ``median``: the median intensity of each tissue label (NCR, ED, ET, brain);
2. ``background``: the median outside the brain (label 0): a grey background fails;
3. ``texture``: sharpness, the robust spread (1.4826 x MAD) of the image minus its 3x3x3 box mean inside the brain
   eroded by one voxel, divided by the interquartile range of the brain's (label 4) intensities. Blur lowers it,
   added noise and a mask painted with flat intensities (no anatomy, so a tiny IQR) raise it; being a ratio it does
   not move with the intensity scale;
4. ``q95``: the 95th percentile of the brain's (label 4) intensities: where the brightest normal tissue sits in the
   [-1, 1] range differs per sequence (T1 high; T1CE low, its top is the enhancing tumour);
5. ``correlation``: the Pearson correlation of each pair of modalities inside the brain (judged as Fisher's z).
   A modality copied into another correlates 1 with it; swapped modalities change their correlations with the rest;
6. ``contrast``: for each tumour label and pair of modalities a - b, (label median - brain median) in a minus the
   same in b. Swapping a and b negates it, copying one into the other makes it 0: the check that separates T1 from
   T1CE (their enhancing-tumour contrasts differ by ~0.8; their correlations with the rest hardly do).

Envelope of a statistic: mean ± k·s widened to the observed range (as MAISI), plus ``margin`` (0.05, the
generator's [-1, 1] units) for the intensity statistics (median, background, q95, contrast). s is a moderated
standard deviation (Smyth 2004): the statistic's own variance over its n training cases shrunk toward the pooled
variance of the same modality's (or pair's) other labels, weighted as w = min(PRIOR_DF, their degrees of freedom)
cases: s² = (w · s_other² + (n - 1) · s_own²) / (w + n - 1). k is the normal tolerance factor (Howe 1969) for n cases
and w + n - 1 degrees of freedom covering 99.9 % of real cases with 95 % confidence, per statistic, so that the ~50
statistics together pass ~99 % of real cases. k and s change smoothly with n: a label seen in 1 or 2 training cases
gets a wide but finite envelope (n = 1: the other labels' s, k ≈ 11), no cliff. A label seen in no training case has
no envelope: its median and contrasts are not judged (``unjudged`` names it); the sample's other checks still are.
Measured on the phantom cohort (real atlas anatomy, simulated tumours; bench/bench_quality_gate.py, 200 random
8-case training draws; docs/decisions/0014-gate-contrast-and-sharpness.md): 98.7 % of held-out real cases pass;
each modality swap passes <= 1.1 %, each copy, blur σ >= 1 voxel and the painted mask <= 0.2 %.
"""
from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np

from core.errors import InputError
from core.fsutil import atomic_write_text
from cohort.labels import BACKGROUND, BRAIN, LABEL_NAMES, TUMOUR_LABELS

GATE_FORMAT = "medddpm-gate-v3"
MIN_VOXELS = 5  # labels smaller than this in a mask are not judged (their median is too noisy)
GATED_LABELS = (1, 2, 3, 4)  # tissue labels, as MAISI gates organs; background has its own check
COVERAGE, CONFIDENCE = 0.999, 0.95  # per statistic: covers 99.9 % of real cases, with 95 % confidence
PRIOR_DF = 4           # at most this many cases' worth of weight for the other labels' pooled variance
MARGIN = 0.05          # intensity units ([-1, 1] space) around the intensity envelopes
INTENSITY_CHECKS = ("median", "background", "q95", "contrast")  # in image units: these get the margin
CHECKS = ("median", "background", "texture", "q95", "correlation", "contrast")
LABELLED_CHECKS = ("median", "contrast")  # per tissue label: where = "<label>/<modality or pair>"
_MAX_R = 1 - 1e-6  # a correlation of 1 (a copied modality) is judged as this, so its Fisher z stays finite


def _residual_spread(x: np.ndarray, inner: np.ndarray) -> float:
    from scipy.ndimage import uniform_filter

    r = (x - uniform_filter(x, size=3, mode="nearest"))[inner]
    # robust scale (MAD): tissue edges are sparse and barely move it; noise, present in every voxel, does
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def _texture_regions(label: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """texture's regions of a mask: (the brain eroded by one voxel, the brain label 4); None if either has fewer
    than MIN_VOXELS voxels. The same for every modality of a sample: case_statistics computes them once."""
    from scipy.ndimage import binary_erosion

    inner = binary_erosion(label > 0)
    normal = label == BRAIN
    if inner.sum() < MIN_VOXELS or normal.sum() < MIN_VOXELS:
        return None
    return inner, normal


def _texture_in(channel: np.ndarray, inner: np.ndarray, normal: np.ndarray) -> float:
    x = np.asarray(channel, dtype=np.float64)
    q25, q75 = np.percentile(x[normal], [25, 75])
    return _residual_spread(x, inner) / max(float(q75 - q25), 1e-6)  # a flat brain has no contrast: a huge ratio


def texture(channel: np.ndarray, label: np.ndarray) -> float:
    """High-frequency residual relative to the tissue contrast: 1.4826 x MAD of channel - (3x3x3 box mean) inside
    the brain eroded by one voxel, over the interquartile range of the brain's (label 4) intensities. NaN if either
    region has fewer than MIN_VOXELS voxels."""
    regions = _texture_regions(label)
    return float("nan") if regions is None else _texture_in(channel, *regions)


def case_statistics(image: np.ndarray, label: np.ndarray, modalities) -> dict:
    """The gate's statistics of one case: {"median": {label: {modality: v}}, "background": {modality: v},
    "texture": {modality: v}, "q95": {modality: v}, "correlation": {"a~b": Fisher z},
    "contrast": {label: {"a-b": v}}}. image: (C, X, Y, Z) in model space; label: (X, Y, Z)."""
    image = np.asarray(image)
    out: dict = {check: {} for check in CHECKS}
    medians: dict[int, np.ndarray] = {}
    values, counts = np.unique(label, return_counts=True)
    for v, n in zip(values.tolist(), counts.tolist()):
        if n < MIN_VOXELS:
            continue
        # every modality in one call, the values of one call per modality; in float64 as the contrasts want them
        med = np.median(image[:, label == v], axis=1).astype(np.float64)
        if v == BACKGROUND:
            out["background"] = {m: float(x) for m, x in zip(modalities, med)}
        elif v in GATED_LABELS:
            medians[v] = med
            out["median"][str(v)] = {m: float(x) for m, x in zip(modalities, med)}
    pairs = list(itertools.combinations(range(len(modalities)), 2))
    if BRAIN in medians:
        for v in TUMOUR_LABELS:
            if v in medians:
                con = medians[v] - medians[BRAIN]
                out["contrast"][str(v)] = {f"{modalities[a]}-{modalities[b]}": float(con[a] - con[b])
                                           for a, b in pairs}
    regions = _texture_regions(label)  # the masks are the same for every modality: computed once
    normal = label == BRAIN
    has_normal = normal.sum() >= MIN_VOXELS
    for ci, m in enumerate(modalities):
        if regions is not None:
            t = _texture_in(image[ci], *regions)
            if np.isfinite(t):
                out["texture"][m] = t
        if has_normal:
            out["q95"][m] = float(np.percentile(image[ci][normal], 95))
    brain = label > 0
    if brain.sum() >= MIN_VOXELS and len(modalities) > 1:
        with np.errstate(invalid="ignore", divide="ignore"):  # a constant channel: no correlation (0)
            r = np.nan_to_num(np.corrcoef(image[:, brain].astype(np.float64)), nan=0.0)
        out["correlation"] = {f"{modalities[a]}~{modalities[b]}": float(np.arctanh(np.clip(r[a, b], -_MAX_R, _MAX_R)))
                              for a, b in pairs}
    return out


def _flat(st: dict) -> dict[tuple[str, str], float]:
    """{(check, where): value}; where is "<label>/<modality or pair>" for the per-label checks."""
    out = {}
    for check in CHECKS:
        for key, val in st.get(check, {}).items():
            if isinstance(val, dict):
                out.update({(check, f"{key}/{m}"): x for m, x in val.items()})
            else:
                out[(check, key)] = val
    return out


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": int(len(v))}


def intensity_ranges(items, modalities: tuple[str, ...]) -> dict:
    """The gate's statistics of the training items ({"image": (C,X,Y,Z) in model space, "label": (1,X,Y,Z)}):
    per statistic the mean, sd, min, max and n over the cases that have it."""
    return ranges_from_statistics([case_statistics(np.asarray(it["image"]), np.asarray(it["label"])[0], modalities)
                                   for it in items], modalities)


def ranges_from_statistics(statistics: list[dict], modalities: tuple[str, ...]) -> dict:
    """intensity_ranges from the cases' case_statistics (computed once, e.g. by a benchmark drawing many
    training sets)."""
    acc: dict[tuple[str, str], list[float]] = {}
    for st in statistics:
        for key, x in _flat(st).items():
            acc.setdefault(key, []).append(x)
    out: dict = {"format": GATE_FORMAT, "n_cases": len(statistics), "modalities": list(modalities)}
    for check in CHECKS:
        block: dict = {}
        for (c, where), xs in sorted(acc.items()):
            if c != check:
                continue
            if c in LABELLED_CHECKS:
                label, rest = where.split("/", 1)
                block.setdefault(label, {})[rest] = _summary(xs)
            else:
                block[where] = _summary(xs)
        out["labels" if check == "median" else check] = block  # "labels": the name earlier formats used
    return out


def tolerance_factor(n: int, df: float | None = None, coverage: float = COVERAGE,
                     confidence: float = CONFIDENCE) -> float:
    """k of the normal tolerance interval mean ± k·s that covers ``coverage`` of the population with
    ``confidence``, for a mean of n cases and an s with df degrees of freedom (default n - 1; Howe 1969):
    z_((1+p)/2) · sqrt(df (1 + 1/n) / chi2_(1-conf; df)). n = 8, df = 11: 5.4; n = 8, df = 7: 6.3; n = 1, df = 4:
    11. inf (no envelope) without a mean or a degree of freedom."""
    from scipy.stats import chi2, norm

    df = n - 1 if df is None else df
    if n < 1 or df < 1:
        return float("inf")
    return float(norm.ppf((1 + coverage) / 2) * np.sqrt(df * (1 + 1 / n) / chi2.ppf(1 - confidence, df)))


def _group(check: str, where: str) -> tuple[str, str]:
    """Statistics whose variances are pooled: a per-label check's statistics of one modality (or pair) across the
    labels (NCR/t1 with ED/t1, ET/t1, brain/t1); any other statistic is its own group."""
    return (check, where.split("/", 1)[1]) if check in LABELLED_CHECKS else (check, where)


def envelopes(ranges: dict, margin: float = MARGIN, k: float | None = None,
              prior_df: float = PRIOR_DF) -> dict[tuple[str, str], tuple[float, float]]:
    """{(check, where): (low, high)} of every statistic in ``ranges``: [min(observed min, mean - k s),
    max(observed max, mean + k s)], plus ``margin`` for the intensity checks. s is the statistic's sd (n cases)
    moderated toward the pooled variance of the other statistics of its group (_group) with weight w = min(prior_df,
    their degrees of freedom): s² = (w s_other² + (n - 1) s²) / (w + n - 1); k the tolerance factor for n cases and
    w + n - 1 degrees of freedom (or the k given). A statistic without a degree of freedom (one training case and
    no other label of its modality to pool with) has no envelope."""
    stats = {(check, where): st for check in CHECKS for where, st in _flat_summaries(ranges, check)}
    sums: dict[tuple[str, str], list[float]] = {}
    for (check, where), st in stats.items():
        acc = sums.setdefault(_group(check, where), [0.0, 0.0])
        acc[0] += max(st["n"] - 1, 0)
        acc[1] += max(st["n"] - 1, 0) * st["sd"] ** 2
    out = {}
    for (check, where), st in stats.items():
        n, own_df = st["n"], max(st["n"] - 1, 0)
        group_df, group_ss = sums[_group(check, where)]
        other_df = group_df - own_df
        w = min(prior_df, other_df)
        df = w + own_df
        if df < 1:
            continue
        s_other2 = (group_ss - own_df * st["sd"] ** 2) / other_df if other_df > 0 else 0.0
        s = float(np.sqrt((w * s_other2 + own_df * st["sd"] ** 2) / df))
        kk = tolerance_factor(n, df) if k is None else k
        mg = margin if check in INTENSITY_CHECKS else 0.0
        out[(check, where)] = (min(st["min"], st["mean"] - kk * s) - mg, max(st["max"], st["mean"] + kk * s) + mg)
    return out


def _flat_summaries(ranges: dict, check: str) -> list[tuple[str, dict]]:
    block = ranges.get("labels" if check == "median" else check, {})
    out = []
    for key, val in block.items():
        if "n" in val and "mean" in val:
            out.append((key, val))
        else:
            out.extend((f"{key}/{m}", s) for m, s in val.items())
    return out


def save_ranges(path: str | Path, ranges: dict) -> None:
    atomic_write_text(path, json.dumps(ranges, indent=1))


def load_ranges(path: str | Path) -> dict:
    """The gate statistics beside a generator. A file of an earlier format (medddpm-gate-v1/-v2: no contrast,
    sharpness or correlation statistics, and an absolute texture) is refused with what to do: its statistics cannot
    be converted, and judging with the old checks alone would pass swapped or blurred samples."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "training intensity ranges missing (written by train_medddpm)", kind="missing-file")
    try:
        ranges = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(p, f"not valid JSON ({e})", kind="unreadable") from e
    if ranges.get("format") != GATE_FORMAT:
        raise InputError(p, f"quality-gate format {ranges.get('format', 'medddpm-gate-v1')!r} is older than "
                            f"{GATE_FORMAT!r} (no contrast and sharpness checks); rebuild it from the generator's real "
                            "training cases: rerun the training command that made this generator (it rewrites the "
                            "file, then resumes or finishes), or for imported weights rerun import-weights with "
                            "--ranges-from MANIFEST",
                         kind="stale-format")
    return ranges


def load_gate_ranges(path: str | Path, imported: bool) -> dict | None:
    """The gate's ranges; for an imported generator (no training data here) None when absent, with a warning."""
    p = Path(path)
    if imported and not p.exists():
        warnings.warn(f"{p} missing: the generator was imported, not trained here, so synthetic cases are not "
                      "quality-gated (quality_gate=unchecked); pass --ranges-from to import-weights to gate them",
                      stacklevel=2)
        return None
    return load_ranges(p)


def _where_label(check: str, where: str) -> str:
    """ "2/flair" -> "ED/flair" for the per-label checks; "brain/<modality>" for the per-modality ones."""
    if check in LABELLED_CHECKS:
        v, rest = where.split("/", 1)
        return f"{LABEL_NAMES.get(int(v), v)}/{rest}"
    return f"{'background' if check == 'background' else 'brain'}/{where}"


def unjudged(label: np.ndarray, ranges: dict | None) -> list[str]:
    """Tissue labels of a mask (>= MIN_VOXELS voxels) that no training case had: their median and contrast have no
    envelope and are not judged (the sample's other checks are)."""
    if ranges is None:
        return []
    seen = set(ranges.get("labels", {}))
    return [LABEL_NAMES[v] for v in GATED_LABELS if (label == v).sum() >= MIN_VOXELS and str(v) not in seen]


def judge(statistics: dict, envs: dict[tuple[str, str], tuple[float, float]]) -> list[str]:
    """Failed checks of a case's statistics (case_statistics) against ``envelopes(ranges)``; statistics without an
    envelope (a label no training case had: see unjudged) are not judged."""
    failures = []
    for (check, where), value in _flat(statistics).items():
        if (check, where) not in envs:
            continue
        lo, hi = envs[(check, where)]
        if not lo <= value <= hi:
            if check == "correlation":  # judged as Fisher's z, shown as Pearson's r
                value, lo, hi = np.tanh(value), np.tanh(lo), np.tanh(hi)
            failures.append(f"{check} {_where_label(check, where)}: {value:.3f} outside [{lo:.3f}, {hi:.3f}]")
    return failures


def check_sample(image: np.ndarray, label: np.ndarray, ranges: dict | None, modalities: tuple[str, ...],
                 margin: float = MARGIN, k: float | None = None,
                 envs: dict[tuple[str, str], tuple[float, float]] | None = None) -> list[str]:
    """Failed checks of one sample (empty list = pass), each "<check> <where>: <value> outside [<low>, <high>]"
    (correlations as Pearson r). image: (C, X, Y, Z) in model space; label: (X, Y, Z). ranges None (an imported
    generator without ranges): nothing is judged. k: a fixed tolerance factor instead of the moderated one. envs:
    ``envelopes(ranges, margin, k)`` computed once by a caller that checks many samples (it costs about as much as
    the sample's own statistics)."""
    if ranges is None:
        return []
    return judge(case_statistics(image, label, modalities), envs if envs is not None else envelopes(ranges, margin, k))

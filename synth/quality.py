"""MAISI-style quality gate for synthetic MRI: per modality, three checks against envelopes learnt from the training
cases (stored beside the generator at training time as intensity_ranges.json):

1. ``median``: the median intensity of each tissue label (NCR, ED, ET, brain) — is the contrast right?
2. ``background``: the median outside the brain (label 0) — a sample whose background is grey (-0.3 instead of
   the training's -1) fails, which check 1 cannot see;
3. ``texture``: the high-frequency energy inside the brain (robust spread, 1.4826 x MAD, of the image minus its
   3x3x3 box mean, on the brain eroded by one voxel so the brain outline does not count) — zero-mean noise, which leaves
   every median in place, raises it (added noise of sd 0.2 fails; real images pass).

Envelope of a statistic (as MAISI: mean ± k·sd, widened to the observed range): [min(lo, mean - k sd) - margin,
max(hi, mean + k sd) + margin] over the training cases' values, margin 0.05 for intensities (the generator's
[-1, 1] space) and 10 % (relative) for the texture. k is a normal tolerance factor: the interval that covers 99 %
of real cases with 95 % confidence from n training cases (4.9 for the study's 8 cases, 3.4 for 30), so a held-out
real case falls outside one of its ~30 envelopes rarely (on the demo phantom 100 % pass with 30 training cases
and with 8: docs/decisions/0010-quality-gate-envelopes.md; test: tests/test_synth_quality.py).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from core.errors import InputError
from core.fsutil import atomic_write_text
from cohort.labels import BACKGROUND, LABEL_NAMES

GATE_FORMAT = "medddpm-gate-v2"
MIN_VOXELS = 5  # labels smaller than this in a mask are not judged (their median is too noisy)
GATED_LABELS = (1, 2, 3, 4)  # tissue labels, as MAISI gates organs; background has its own check
COVERAGE, CONFIDENCE = 0.99, 0.95  # the envelope covers 99 % of real cases, with 95 % confidence
MARGIN = 0.05          # intensity units ([-1, 1] space) around the median and background envelopes
TEXTURE_MARGIN = 0.10  # relative (10 %) around the texture envelope: a noise level has no absolute scale


def texture(channel: np.ndarray, label: np.ndarray) -> float:
    """Robust spread (1.4826 x median absolute deviation) of channel - (3x3x3 box mean) inside the brain eroded by
    one voxel (NaN if that is empty): a noise level that tissue edges hardly affect."""
    from scipy.ndimage import binary_erosion, uniform_filter

    inner = binary_erosion(label > 0)
    if inner.sum() < MIN_VOXELS:
        return float("nan")
    x = np.asarray(channel, dtype=np.float64)
    r = (x - uniform_filter(x, size=3, mode="nearest"))[inner]
    # robust scale (MAD): tissue edges are sparse and barely move it; noise, present in every voxel, does
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def case_statistics(image: np.ndarray, label: np.ndarray, modalities) -> dict:
    """{"median": {label: {modality: v}}, "background": {modality: v}, "texture": {modality: v}} of one case."""
    out: dict = {"median": {}, "background": {}, "texture": {}}
    for v in np.unique(label).tolist():
        sel = label == v
        if sel.sum() < MIN_VOXELS:
            continue
        for ci, m in enumerate(modalities):
            med = float(np.median(image[ci][sel]))
            if v == BACKGROUND:
                out["background"][m] = med
            elif v in GATED_LABELS:
                out["median"].setdefault(str(v), {})[m] = med
    for ci, m in enumerate(modalities):
        t = texture(image[ci], label)
        if np.isfinite(t):
            out["texture"][m] = t
    return out


def _summary(values: list[float]) -> dict:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "min": float(v.min()),
            "max": float(v.max()), "n": int(len(v))}


def intensity_ranges(items: list[dict], modalities: tuple[str, ...]) -> dict:
    """The gate's statistics of the training items ({"image": (C,X,Y,Z) in model space, "label": (1,X,Y,Z)})."""
    acc: dict = {"median": {}, "background": {}, "texture": {}}
    for it in items:
        st = case_statistics(np.asarray(it["image"]), np.asarray(it["label"])[0], modalities)
        for v, d in st["median"].items():
            for m, x in d.items():
                acc["median"].setdefault(v, {}).setdefault(m, []).append(x)
        for key in ("background", "texture"):
            for m, x in st[key].items():
                acc[key].setdefault(m, []).append(x)
    return {"format": GATE_FORMAT, "n_cases": len(items), "modalities": list(modalities),
            "labels": {v: {m: _summary(xs) for m, xs in d.items()} for v, d in sorted(acc["median"].items())},
            "background": {m: _summary(xs) for m, xs in acc["background"].items()},
            "texture": {m: _summary(xs) for m, xs in acc["texture"].items()}}


def tolerance_factor(n: int, coverage: float = COVERAGE, confidence: float = CONFIDENCE) -> float:
    """k of the normal tolerance interval mean ± k·sd that covers ``coverage`` of the population with
    ``confidence``, estimated from n cases (Howe 1969): z_((1+p)/2) · sqrt((n-1)(1+1/n) / chi2_(1-conf; n-1)).
    It grows as n shrinks (n = 8: 4.9; 30: 3.4), so 8 training cases give a wide enough envelope."""
    from scipy.stats import chi2, norm

    if n < 2:
        return float("inf")
    return float(norm.ppf((1 + coverage) / 2) * np.sqrt((n - 1) * (1 + 1 / n) / chi2.ppf(1 - confidence, n - 1)))


def envelope(stat: dict, k: float | None = None, margin: float = MARGIN, relative: bool = False
             ) -> tuple[float, float]:
    """[min(observed min, mean - k sd), max(observed max, mean + k sd)], widened by ``margin`` (intensity units),
    or, ``relative``, scaled by 1 -/+ margin (for a spread, whose scale is the image's own). k None: the tolerance
    factor for the statistic's number of training cases (first-format files, n = 0: the observed range)."""
    if k is None:
        k = tolerance_factor(stat["n"]) if stat.get("n", 0) >= 2 else 0.0
    lo, hi = min(stat["min"], stat["mean"] - k * stat["sd"]), max(stat["max"], stat["mean"] + k * stat["sd"])
    return (lo * (1 - margin), hi * (1 + margin)) if relative else (lo - margin, hi + margin)


def save_ranges(path: str | Path, ranges: dict) -> None:
    atomic_write_text(path, json.dumps(ranges, indent=1))


def load_ranges(path: str | Path) -> dict:
    """The gate statistics beside a generator. Files of the first format (per label [min, max] of medians only)
    are read as envelopes of the observed range; their background and texture checks are then skipped."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "training intensity ranges missing (written by train_medddpm)", kind="missing-file")
    try:
        ranges = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise InputError(p, f"not valid JSON ({e})", kind="unreadable") from e
    if ranges.get("format") != GATE_FORMAT:
        ranges = {"format": "medddpm-gate-v1", "n_cases": ranges.get("n_cases"), "modalities": ranges.get("modalities"),
                  "labels": {v: {m: {"mean": (lo + hi) / 2, "sd": 0.0, "min": lo, "max": hi, "n": 0}
                                 for m, (lo, hi) in d.items()} for v, d in ranges.get("labels", {}).items()},
                  "background": {}, "texture": {}}
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


def check_sample(image: np.ndarray, label: np.ndarray, ranges: dict | None, modalities: tuple[str, ...],
                 margin: float = MARGIN, k: float | None = None) -> list[str]:
    """Failed checks of one sample (empty list = pass), each "<check> <label>/<modality>: <value> outside
    [<low>, <high>]". image: (C, X, Y, Z) in model space; label: (X, Y, Z). ranges None (an imported generator
    without ranges): nothing is judged."""
    if ranges is None:
        return []
    st = case_statistics(image, label, modalities)
    failures = []

    def judge(check: str, where: str, value: float, stat: dict | None) -> None:
        if stat is None:
            return
        lo, hi = envelope(stat, k, TEXTURE_MARGIN, relative=True) if check == "texture" else envelope(stat, k, margin)
        if not lo <= value <= hi:
            failures.append(f"{check} {where}: {value:.3f} outside [{lo:.3f}, {hi:.3f}]")

    for v, d in st["median"].items():
        for m, x in d.items():
            judge("median", f"{LABEL_NAMES.get(int(v), v)}/{m}", x, ranges["labels"].get(v, {}).get(m))
    for m, x in st["background"].items():
        judge("background", f"background/{m}", x, ranges.get("background", {}).get(m))
    for m, x in st["texture"].items():
        judge("texture", f"brain/{m}", x, ranges.get("texture", {}).get(m))
    return failures

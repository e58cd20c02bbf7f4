"""MAISI-style quality gate: per label and modality, a synthetic image's median intensity must fall inside the
range of per-case medians seen in the training data (stored beside the checkpoint at training time)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from cohort.errors import CohortError
from cohort.fsutil import atomic_write_text
from cohort.labels import LABEL_NAMES

MIN_VOXELS = 5  # labels smaller than this in a mask are not judged (their median is too noisy)
GATED_LABELS = (1, 2, 3, 4)  # tissue labels, as MAISI gates organs; background (air) is not judged


def intensity_ranges(items: list[dict], modalities: tuple[str, ...]) -> dict:
    """{"labels": {label: {modality: [min, max] of per-case medians}}, "n_cases": n} from normalised items."""
    per: dict[int, dict[str, list[float]]] = {}
    for it in items:
        img = np.asarray(it["image"])
        lab = np.asarray(it["label"])[0]
        for v in np.unique(lab).tolist():
            sel = lab == v
            if sel.sum() < MIN_VOXELS:
                continue
            for ci, m in enumerate(modalities):
                per.setdefault(int(v), {}).setdefault(m, []).append(float(np.median(img[ci][sel])))
    return {"n_cases": len(items), "modalities": list(modalities),
            "labels": {str(v): {m: [min(xs), max(xs)] for m, xs in d.items()} for v, d in sorted(per.items())}}


def save_ranges(path: str | Path, ranges: dict) -> None:
    atomic_write_text(path, json.dumps(ranges, indent=1))


def load_ranges(path: str | Path) -> dict:
    p = Path(path)
    if not p.exists():
        raise CohortError(p, "training intensity ranges missing (written by train_medddpm)", kind="missing-file")
    return json.loads(p.read_text())


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
                 margin: float = 0.05) -> list[str]:
    """Failures (empty list = pass) for one sample: image (C, X, Y, Z) in model space, label (X, Y, Z).
    ranges None (an imported generator without ranges): nothing is judged."""
    if ranges is None:
        return []
    failures = []
    for v in np.unique(label).tolist():
        sel = label == v
        if v not in GATED_LABELS or sel.sum() < MIN_VOXELS or str(v) not in ranges["labels"]:
            continue
        for ci, m in enumerate(modalities):
            lo, hi = ranges["labels"][str(v)].get(m, (None, None))
            if lo is None:
                continue
            med = float(np.median(image[ci][sel]))
            if not (lo - margin <= med <= hi + margin):
                failures.append(f"{LABEL_NAMES.get(v, v)}/{m}: median {med:.3f} outside [{lo:.3f}, {hi:.3f}]")
    return failures

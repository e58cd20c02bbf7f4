"""Choosing and loading the cases a segmenter trains, validates and predicts on (shared by both back ends)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from core.errors import InputError
from core.fsutil import sha256_bytes, sha256_file
from cohort.labels import MODALITIES, TUMOUR_LABELS
from cohort.case import Case
from cohort.manifest import SPLITS, case_files, load_manifest, read_case, row_modalities, select
from cohort.volume import Volume, select_channels

# The segmentation target: background 0, NCR 1, ED 2, ET 3. Brain (label 4) is not a target and becomes 0.
N_CLASSES = 1 + len(TUMOUR_LABELS)


def to_target(label: np.ndarray) -> np.ndarray:
    """Map a label map in the cohort convention (0..4) to the segmentation target (0..3, brain -> 0)."""
    out = np.asarray(label).astype(np.uint8, copy=True)
    out[out > max(TUMOUR_LABELS)] = 0
    return out


def resolve_case_ids(manifest: str | Path, cases: Sequence[str] | str | None) -> list[str]:
    """Case ids from a list of ids, a split name ("train", "val", "test") or None (= every row with an image).

    A split name selects rows of that split of any image source (real or synthetic).
    """
    df = load_manifest(manifest)
    if cases is None:
        return df[df["source"] != "mask"]["case_id"].tolist()
    if isinstance(cases, str):
        if cases in SPLITS:
            return df[(df["split"] == cases) & (df["source"] != "mask")]["case_id"].tolist()
        cases = [cases]
    ids = [str(c) for c in cases]
    missing = sorted(set(ids) - set(df["case_id"]))
    if missing:
        raise InputError(manifest, f"case ids {missing[:5]}{'…' if len(missing) > 5 else ''} are not in the manifest",
                          kind="missing-case")
    if len(set(ids)) != len(ids):
        raise InputError(manifest, "the same case id was selected twice", kind="duplicate-case")
    return ids


def rows_for(manifest: str | Path, case_ids: Sequence[str]) -> pd.DataFrame:
    df = load_manifest(manifest).set_index("case_id", drop=False)
    rows = df.loc[list(case_ids)]
    masks = rows[rows["source"] == "mask"]["case_id"].tolist()
    if masks:
        raise InputError(manifest, f"cases {masks[:5]} are conditioning masks (source=mask) without an image; "
                                    "a segmenter needs image rows", kind="bad-selection")
    return rows


def validation_ids(manifest: str | Path, train_ids: Sequence[str], val_ids: Sequence[str] | None) -> list[str]:
    """Validation is real-only: given ids must be source=real; by default the real val-split rows not trained on."""
    df = load_manifest(manifest)
    if val_ids is None:
        ids = select(df, source="real", split="val")["case_id"].tolist()
        return [c for c in ids if c not in set(train_ids)]
    ids = resolve_case_ids(manifest, list(val_ids))
    src = df.set_index("case_id").loc[ids, "source"]
    not_real = src[src != "real"].index.tolist()
    if not_real:
        raise InputError(manifest, f"validation cases must be real; {not_real[:5]} are not", kind="bad-selection")
    overlap = sorted(set(ids) & set(train_ids))
    if overlap:
        raise InputError(manifest, f"cases {overlap[:5]} are both training and validation cases", kind="bad-selection")
    return ids


def common_modalities(manifest: str | Path, case_ids: Sequence[str]) -> list[str]:
    rows = rows_for(manifest, case_ids)
    have = set(MODALITIES)
    for _, row in rows.iterrows():
        have &= set(row_modalities(row))
    mods = [m for m in MODALITIES if m in have]
    if not mods:
        raise InputError(manifest, "the selected cases share no image modality", kind="missing-modality")
    return mods


def training_data_hash(manifest: str | Path, case_ids: Sequence[str]) -> tuple[str, list[list[str]]]:
    """sha256 of the sorted (case_id, file sha256) list of every file (images and label) of the cases.

    Files are hashed now (not taken from the manifest), so the hash is of what was actually trained on.
    """
    entries = []
    for _, row in rows_for(manifest, case_ids).iterrows():
        cf = case_files(manifest, row)
        for p in (*cf.images.values(), cf.label):
            entries.append([cf.case_id, sha256_file(p)])
    entries.sort()
    return sha256_bytes(json.dumps(entries).encode()), entries


def normalise(image: np.ndarray) -> np.ndarray:
    """Per-channel z-score over the whole volume (the images of every cohort are already on one intensity scale)."""
    image = np.asarray(image, np.float32)
    mean = image.mean(axis=(1, 2, 3), keepdims=True)
    std = image.std(axis=(1, 2, 3), keepdims=True)
    return ((image - mean) / np.maximum(std, 1e-6)).astype(np.float32)


def load_cases(manifest: str | Path, case_ids: Sequence[str], modalities: Sequence[str]) -> list[Case]:
    """The cases as a network sees them: image = the modalities in that order, z-scored (normalise);
    label = the segmentation target (to_target: 0..3)."""
    rows = rows_for(manifest, case_ids)
    cases = []
    for cid in case_ids:
        case = read_case(manifest, rows.loc[cid])
        image = select_channels(case.image, modalities, manifest, f"the model (modalities {list(modalities)})",
                                case_id=cid)
        cases.append(Case.from_arrays(cid, Volume(normalise(image.data), image.affine, image.channels),
                                      to_target(case.label_map)))
    return cases

"""Dice and HD95 per BraTS region (WT, TC, ET) and per case, computed with MONAI's metric functions.

Empty-region convention (the BraTS challenge's; MONAI alone would give NaN HD95 for both cases below):
- truth and prediction both empty  -> Dice 1, HD95 0 mm (MONAI ``ignore_empty=False`` gives the Dice 1);
- exactly one of them empty        -> Dice 0, HD95 = the image diagonal in mm, the largest distance the grid
  allows (BraTS uses 373.13 mm, the diagonal of its 240x240x155 1-mm grid). A missed or hallucinated region
  is therefore penalised in the mean instead of silently dropped.
HD95 is in millimetres: MONAI gets the voxel spacing read from the truth label's affine.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from core.errors import InputError
from cohort.labels import REGIONS, region_mask
from cohort.volume import spacing_of

PER_CASE_COLUMNS = ("case_id", "region", "dice", "hd95")


def image_diagonal_mm(shape, spacing) -> float:
    """Length of the grid's diagonal in mm: the HD95 given when exactly one of truth/prediction is empty."""
    return float(np.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def _as_batch(masks: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(masks, dtype=bool)[None].astype(np.float32))


def mask_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of binary masks stacked on a leading channel axis (C, X, Y, Z), with the empty-region convention of
    this module's docstring (both empty: 1; exactly one empty: 0). The one Dice of the project."""
    from monai.metrics import compute_dice

    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or pred.ndim != 4:
        raise ValueError(f"pred {pred.shape} and truth {truth.shape} must both be (C, X, Y, Z)")
    dice = compute_dice(_as_batch(pred), _as_batch(truth), include_background=True,
                        ignore_empty=False)[0].numpy().astype(float)
    p_empty, t_empty = _empty(pred), _empty(truth)
    dice[p_empty & t_empty] = 1.0
    dice[p_empty ^ t_empty] = 0.0
    return dice


def _empty(masks: np.ndarray) -> np.ndarray:
    return ~masks.reshape(len(masks), -1).any(1)


def dice_hd95(pred: np.ndarray, truth: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Dice and HD95 (mm) of binary masks stacked on a leading channel axis.

    pred, truth: bool arrays (C, X, Y, Z), one channel per region. Returns (dice[C], hd95[C]) with the
    empty-region convention of this module's docstring.
    """
    from monai.metrics import compute_hausdorff_distance

    dice = mask_dice(pred, truth)
    pred = np.asarray(pred, dtype=bool)
    truth = np.asarray(truth, dtype=bool)
    with warnings.catch_warnings():
        # MONAI warns about empty masks; we replace those entries by the documented convention below
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(_as_batch(pred), _as_batch(truth), include_background=True, percentile=95,
                                        spacing=[float(s) for s in spacing])[0].numpy().astype(float)
    p_empty, t_empty = _empty(pred), _empty(truth)
    hd[p_empty & t_empty] = 0.0
    hd[p_empty ^ t_empty] = image_diagonal_mm(pred.shape[1:], spacing)
    return dice, hd


def region_masks(label: np.ndarray, regions: Iterable[str] = tuple(REGIONS)) -> np.ndarray:
    """(R, X, Y, Z) boolean masks of the evaluation regions (WT, TC, ET) of a label map (0..3 or 0..4)."""
    return np.stack([region_mask(label, r) for r in regions])


def _check_same_shape(pred_label: np.ndarray, true_label: np.ndarray) -> None:
    if pred_label.shape != true_label.shape:
        raise ValueError(f"prediction shape {pred_label.shape} differs from truth shape {true_label.shape}")


def region_dice(pred_label: np.ndarray, true_label: np.ndarray,
                regions: Iterable[str] = tuple(REGIONS)) -> np.ndarray:
    """Dice per region of two label maps: the Dice of region_scores without the (slower) HD95; used for the
    segmenters' model selection so that it ranks epochs by the Dice the study reports."""
    _check_same_shape(pred_label, true_label)
    regions = list(regions)
    return mask_dice(region_masks(pred_label, regions), region_masks(true_label, regions))


def region_scores(pred_label: np.ndarray, true_label: np.ndarray, spacing,
                  regions: Iterable[str] = tuple(REGIONS)) -> pd.DataFrame:
    """Dice and HD95 of two label maps (cohort.labels convention) for each region; columns region, dice, hd95."""
    _check_same_shape(pred_label, true_label)
    regions = list(regions)
    dice, hd = dice_hd95(region_masks(pred_label, regions), region_masks(true_label, regions), spacing)
    return pd.DataFrame({"region": regions, "dice": dice, "hd95": hd})


def evaluate_predictions(predictions: Mapping[str, str | Path], manifest: str | Path,
                         case_ids: Iterable[str] | None = None, *, progress: bool = True) -> pd.DataFrame:
    """Score predicted label maps against the manifest's labels.

    predictions: {case_id: path to a predicted label NIfTI (values 0..4, same grid as the truth)}.
    manifest: a data_manifest.csv holding those case ids (labels are read through cohort).
    case_ids: cases to score (default: every key of ``predictions``); each needs a prediction.
    Returns one row per (case, region), columns ``case_id, region, dice, hd95`` (hd95 in mm), regions in
    cohort.labels.REGIONS order. Raises InputError naming the file for a missing case, missing prediction
    or a prediction on another grid.
    """
    from cohort.manifest import case_files, load_manifest
    from cohort.nifti import check_same_geometry, read_label

    manifest = Path(manifest)
    df = load_manifest(manifest).set_index("case_id", drop=False)
    ids = list(predictions) if case_ids is None else [str(c) for c in case_ids]
    frames = []
    for cid in tqdm(ids, desc="Dice/HD95", unit="case", disable=not progress or len(ids) < 2):
        if cid not in predictions:
            raise InputError(manifest, f"no prediction given for case {cid}", kind="missing-file")
        if cid not in df.index:
            raise InputError(manifest, f"case {cid} (predicted in {predictions[cid]}) is not in the manifest",
                              kind="missing-case")
        truth_path = case_files(manifest, df.loc[cid]).label
        truth, t_aff = read_label(truth_path)
        pred, p_aff = read_label(predictions[cid])
        if pred.shape != truth.shape:
            raise InputError(predictions[cid], f"prediction shape {pred.shape} differs from the label "
                                                f"{truth_path} shape {truth.shape}", kind="shape-mismatch")
        check_same_geometry(predictions[cid], p_aff, truth_path, t_aff)
        scores = region_scores(pred, truth, spacing_of(t_aff))
        scores.insert(0, "case_id", cid)
        frames.append(scores)
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c in ("dice", "hd95") else object)
                             for c in PER_CASE_COLUMNS})
    return pd.concat(frames, ignore_index=True)[list(PER_CASE_COLUMNS)]

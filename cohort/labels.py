"""Label convention shared by every package (BraTS semantics plus the paper's brain label)."""
from __future__ import annotations

import numpy as np

BACKGROUND, NCR, ED, ET, BRAIN = 0, 1, 2, 3, 4
LABEL_NAMES = {BACKGROUND: "background", NCR: "NCR", ED: "ED", ET: "ET", BRAIN: "brain"}
ALLOWED_LABELS = frozenset(LABEL_NAMES)
TUMOUR_LABELS = (NCR, ED, ET)

# Evaluation regions (BraTS): whole tumour, tumour core, enhancing tumour.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (NCR, ED, ET), "TC": (NCR, ET), "ET": (ET,)}

# BraTS 2021 files use 4 for enhancing tumour; we use 3 and keep 4 for brain.
BRATS_TO_OURS = {0: BACKGROUND, 1: NCR, 2: ED, 4: ET}

MODALITIES = ("t1", "t1ce", "t2", "flair")


def region_mask(label: np.ndarray, region: str) -> np.ndarray:
    """Boolean mask of an evaluation region (WT, TC or ET) in a label map."""
    return np.isin(label, REGIONS[region])


def tumour_mask(label: np.ndarray) -> np.ndarray:
    return np.isin(label, TUMOUR_LABELS)


def tumour_slice(label: np.ndarray) -> int:
    """Axial index through the tumour's centre (the middle slice if the label map has no tumour): where every
    montage and preview cuts a volume."""
    tumour = np.argwhere(tumour_mask(label))
    return int(np.round(tumour[:, 2].mean())) if len(tumour) else label.shape[2] // 2


def brain_mask(label: np.ndarray) -> np.ndarray:
    """Brain including tumour (label 4 plus all tumour labels)."""
    return (label == BRAIN) | tumour_mask(label)

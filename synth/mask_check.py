"""Conditioning masks checked against a generator before the first sample.

Poor samples from published Med-DDPM weights came from masks missing the brain label the model was trained with,
and from masks on another grid (Med-DDPM issues #28, #31, #41). Every mask is checked for: one label channel, the
generator profile's grid and spacing, values of the label convention (cohort.labels) only, and the brain/head
label (4) that every condition scheme of synth.config has a channel for. All problems of all masks are collected
and reported in one InputError, one line per problem naming the file and what to do.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import InputError
from cohort.labels import ALLOWED_LABELS, BRAIN
from cohort.manifest import case_files
from cohort.nifti import checked_labels, read_channels
from cohort.profiles import Profile, get_profile
from cohort.volume import spacing_of

from .config import CONDITION_CHANNELS, CONDITION_LABELS, MedDDPMConfig

DERIVE_BRAIN = ("derive the brain label from an image or a template with `medddpm import-masks --brain-from "
                "image|template`")


def mask_problems(path: str | Path, data: np.ndarray, affine: np.ndarray, cfg: MedDDPMConfig,
                  grid: Profile | None = None) -> list[str]:
    """The problems of one mask (``data``: (C, X, Y, Z) as read, ``affine``) for a generator of config ``cfg``,
    each a line "<path>: <problem>; <what to do>". Empty: the mask fits."""
    grid = grid or get_profile(cfg.profile)
    names = CONDITION_CHANNELS[cfg.condition]
    out = []
    if data.shape[0] != 1:
        out.append(f"{path}: has {data.shape[0]} channels; the generator takes one label map (values "
                   f"{sorted(ALLOWED_LABELS)}) and makes its {len(names)} condition channels ({', '.join(names)}) "
                   "itself: write the mask as one 3-D label map")
        return out
    lab = data[0]
    if tuple(lab.shape) != tuple(grid.shape):
        out.append(f"{path}: grid {'x'.join(map(str, lab.shape))} is not the generator's "
                   f"{'x'.join(map(str, grid.shape))} (profile {grid.name}); bring it to that grid with "
                   f"`medddpm import-masks --profile {grid.name}`")
    spacing = np.asarray(spacing_of(affine))
    if not np.allclose(spacing, grid.spacing, rtol=1e-3, atol=1e-3):
        out.append(f"{path}: spacing {np.round(spacing, 4).tolist()} mm is not the generator's "
                   f"{list(grid.spacing)} mm (profile {grid.name}); resample it with "
                   f"`medddpm import-masks --profile {grid.name}`")
    rounded = np.rint(lab)
    if float(np.abs(lab - rounded).max(initial=0.0)) > 1e-3:  # integer up to float rounding
        out.append(f"{path}: has non-integer values (an interpolated or probability map?); write integer labels "
                   f"{sorted(ALLOWED_LABELS)} (resample with nearest neighbour)")
        return out
    lo, hi = int(rounded.min()), int(rounded.max())
    if 0 <= lo and hi < 256:  # the usual case: a histogram is ~10x faster than np.unique's sort at paper size
        values = set(np.flatnonzero(np.bincount(rounded.astype(np.uint8).ravel(), minlength=1)).tolist())
    else:
        values = set(np.unique(rounded.astype(np.int64)).tolist())
    unknown = sorted(values - set(ALLOWED_LABELS))
    if unknown:
        out.append(f"{path}: label values {unknown} are not in the convention {sorted(ALLOWED_LABELS)} "
                   "(0 background, 1 NCR, 2 ED, 3 ET, 4 brain); map them with `medddpm import-masks --label-map`")
    wants_brain = any(BRAIN in vals for vals in CONDITION_LABELS[cfg.condition])
    if wants_brain and BRAIN not in values:
        what = "brain" if cfg.condition == "brats" else "head"
        out.append(f"{path}: no {what} label ({BRAIN}); the generator was trained with one (condition "
                   f"{cfg.condition}: {', '.join(names)}) and samples poor images without it: {DERIVE_BRAIN}")
    return out


def check_masks(masks_manifest: str | Path, rows: pd.DataFrame, cfg: MedDDPMConfig, *,
                keep_bytes: int = 0) -> dict[Path, tuple[np.ndarray, np.ndarray]]:
    """Check the label file of every row of ``rows`` (rows of ``masks_manifest``) against the generator config;
    raise one InputError(masks_manifest, ...) listing every problem of every mask.

    Returns {label file: (label map, affine)} of the masks it read, as cohort.nifti.read_label gives them, while
    their label maps together stay within ``keep_bytes`` (0: none), so a caller that samples on them need not read
    them again; a mask read_label would refuse is one more problem in the error."""
    grid = get_profile(cfg.profile)
    problems: list[str] = []
    kept: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    kept_bytes = 0
    for path in dict.fromkeys(case_files(masks_manifest, row).label for _, row in rows.iterrows()):
        try:
            data, affine = read_channels(path)
        except InputError as e:  # unreadable, missing, not 3-D/4-D: one line among the others
            problems.append(str(e))
            continue
        found = mask_problems(path, data, affine, cfg, grid)
        problems += found
        if found or kept_bytes + data[0].size > keep_bytes:  # uint8 labels: one byte a voxel
            continue
        try:
            kept[path] = (checked_labels(path, data[0]), affine)
            kept_bytes += data[0].size
        except InputError as e:
            problems.append(str(e))
    if problems:
        n_bad = len({p.split(": ", 1)[0] for p in problems})
        raise InputError(masks_manifest, f"{n_bad} of {len(rows)} conditioning mask(s) do not fit the generator "
                                         f"(profile {cfg.profile}, condition {cfg.condition}); nothing was "
                                         "sampled:\n  " + "\n  ".join(problems), kind="bad-mask")
    return kept


"""The data-scarce regime: n real training cases drawn once with a seed, shared by every training mix."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import InputError, ConfigError
from .manifest import load_manifest, select, write_manifest


def draw_training_cases(df: pd.DataFrame, n_real: int, seed: int, where: str | Path | None = None) -> pd.DataFrame:
    """``n_real`` rows of the real training cases of manifest ``df`` (``where``: its path, for messages), drawn
    with ``seed`` from the cases sorted by id and returned in id order, so the same (cohort, n, seed) always
    gives the same cases."""
    if n_real < 1:
        raise ConfigError(f"n_real must be at least 1, got {n_real}")
    train = select(df, source="real", split="train").sort_values("case_id")
    if n_real > len(train):
        raise InputError(where, f"n_real={n_real} but the cohort has only {len(train)} real training cases",
                          kind="bad-selection")
    pick = np.sort(np.random.default_rng(seed).permutation(len(train))[:n_real])
    return train.iloc[pick]


def selection_path(manifest: str | Path, n_real: int, seed: int) -> Path:
    """Where ``write_training_selection`` puts the selection: beside the cohort's manifest (same data root, so
    its relative paths stay valid)."""
    return Path(manifest).parent / f"train_n{n_real}_seed{seed}.csv"


def write_training_selection(manifest: str | Path, n_real: int, seed: int) -> Path:
    """The drawn cases (``draw_training_cases``) written as a manifest beside ``manifest``; returns its path."""
    out = selection_path(manifest, n_real, seed)
    write_manifest(draw_training_cases(load_manifest(manifest), n_real, seed, where=manifest), out)
    return out

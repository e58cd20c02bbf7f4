"""Training data as MONAI dictionary transforms over manifest rows (cohort reads the NIfTI files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, EnsureTyped, MapTransform, ScaleIntensityd

from cohort.errors import CohortError, ConfigError
from cohort.manifest import load_manifest, read_case, select
from cohort.volume import select_channels

from .config import MedDDPMConfig
from .network import condition_from_label


class LoadManifestCased(MapTransform):
    """{"row": manifest row} -> {"image": (C,X,Y,Z) float32 in config.modalities order, "label": (1,X,Y,Z) uint8,
    "affine": 4x4, "case_id": str}. A thin MONAI-compatible wrapper around cohort.manifest.read_case."""

    def __init__(self, manifest: str | Path, modalities: tuple[str, ...], shape: tuple[int, int, int] | None = None):
        super().__init__(keys=("row",))
        self.manifest = Path(manifest)
        self.modalities = tuple(modalities)
        self.shape = tuple(shape) if shape is not None else None

    def __call__(self, data: dict) -> dict:
        row = data["row"]
        case = read_case(self.manifest, row)
        image = select_channels(case.image, self.modalities, self.manifest, "the model", case_id=case.case_id).data
        if self.shape is not None and case.shape != self.shape:
            raise CohortError(self.manifest, f"case {case.case_id}: shape {case.shape} is not the profile's "
                                             f"{self.shape}", kind="shape-mismatch")
        return {"image": image, "label": case.label.data.astype(np.uint8), "affine": case.affine,
                "case_id": case.case_id}


class LabelToConditiond(MapTransform):
    """Add "condition": the one-hot condition channels of the label map (scheme of the config)."""

    def __init__(self, scheme: str, label_key: str = "label", out_key: str = "condition"):
        super().__init__(keys=(label_key,))
        self.scheme, self.label_key, self.out_key = scheme, label_key, out_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        d[self.out_key] = condition_from_label(np.asarray(d[self.label_key]), self.scheme)
        return d


def training_transforms(manifest: str | Path, config: MedDDPMConfig, shape=None) -> Compose:
    steps = [LoadManifestCased(manifest, config.modalities, shape)]
    if config.normalise == "minmax":  # the paper: per volume, per modality rescale to [-1, 1]
        steps.append(ScaleIntensityd(keys="image", minv=-1.0, maxv=1.0, channel_wise=True))
    elif config.normalise != "none":
        raise ConfigError(f"unknown normalise mode {config.normalise!r}")
    steps += [LabelToConditiond(config.condition),
              EnsureTyped(keys=("image", "condition"), data_type="tensor", dtype=torch.float32, track_meta=False)]
    return Compose(steps)


def training_rows(manifest: str | Path, config: MedDDPMConfig, splits=None) -> pd.DataFrame:
    df = load_manifest(manifest)
    rows = select(df, source=config.sources, split=splits or config.splits)
    if not len(rows):
        raise CohortError(manifest, f"no rows with source in {list(config.sources)} and split in "
                                    f"{list(splits or config.splits)} to train on", kind="empty-cohort")
    return rows.sort_values("case_id")


def load_items(manifest: str | Path, config: MedDDPMConfig, rows: pd.DataFrame, shape=None) -> list[dict]:
    """Load and transform every row once (the cohorts trained here fit in memory; MONAI CacheDataset style)."""
    from monai.data import CacheDataset

    ds = CacheDataset([{"row": r} for _, r in rows.iterrows()], training_transforms(manifest, config, shape),
                      cache_rate=1.0, num_workers=0, progress=False)
    return [ds[i] for i in range(len(ds))]

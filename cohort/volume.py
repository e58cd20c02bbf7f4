"""An image always travels with its affine, spacing and channel (modality) names (torchio style)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from core.errors import InputError


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) of a 4x4 voxel-to-world affine: the length of each voxel axis in world space."""
    a = np.asarray(affine, dtype=np.float64)
    return tuple(float(s) for s in np.sqrt((a[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


@dataclass(frozen=True)
class Volume:
    """A 3-D image with one or more channels on one voxel grid.

    data: (C, X, Y, Z) array in voxel order of ``affine`` (nibabel convention).
    affine: 4x4 voxel-to-world (RAS+ mm) matrix.
    channels: one name per channel, e.g. ("t1", "t1ce", "t2", "flair") or ("label",).
    """

    data: np.ndarray
    affine: np.ndarray
    channels: tuple[str, ...] = field(default=("image",))

    def __post_init__(self):
        if self.data.ndim != 4:
            raise ValueError(f"Volume data must be (C, X, Y, Z), got shape {self.data.shape}")
        if len(self.channels) != self.data.shape[0]:
            raise ValueError(f"{len(self.channels)} channel names for {self.data.shape[0]} channels")
        object.__setattr__(self, "affine", np.asarray(self.affine, dtype=np.float64))
        if self.affine.shape != (4, 4):
            raise ValueError(f"affine must be 4x4, got {self.affine.shape}")
        object.__setattr__(self, "channels", tuple(self.channels))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.data.shape[1:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_of(self.affine)

    def channel(self, name: str) -> np.ndarray:
        return self.data[self.channels.index(name)]

    @classmethod
    def from_channels(cls, arrays: dict[str, np.ndarray], affine: np.ndarray) -> "Volume":
        names = tuple(arrays)
        return cls(np.stack([arrays[n] for n in names]), affine, names)


def select_channels(volume: Volume, names: Sequence[str], where: str | Path | None, needed_by: str, *,
                    case_id: str | None = None) -> Volume:
    """The channels ``names`` of volume, in that order (float32): the one missing-modality check. A missing one raises
    InputError(where, "[case X: ]missing modality [...] needed by <needed_by> (have [...])",
    kind="missing-modality")."""
    missing = [m for m in names if m not in volume.channels]
    if missing:
        prefix = f"case {case_id}: " if case_id is not None else ""
        raise InputError(where, f"{prefix}missing modality {missing} needed by {needed_by} "
                                 f"(have {list(volume.channels)})", kind="missing-modality")
    return Volume(np.stack([volume.channel(m) for m in names]).astype(np.float32), volume.affine, tuple(names))

"""An image always travels with its affine, spacing and channel (modality) names (torchio style)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


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
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]

    def channel(self, name: str) -> np.ndarray:
        return self.data[self.channels.index(name)]

    def with_data(self, data: np.ndarray, channels: tuple[str, ...] | None = None) -> "Volume":
        """Same geometry, new voxels."""
        return Volume(data, self.affine, channels if channels is not None else self.channels)

    @classmethod
    def from_channels(cls, arrays: dict[str, np.ndarray], affine: np.ndarray) -> "Volume":
        names = tuple(arrays)
        return cls(np.stack([arrays[n] for n in names]), affine, names)

    def same_grid(self, other: "Volume", atol: float = 1e-3) -> bool:
        return self.shape == other.shape and np.allclose(self.affine, other.affine, atol=atol)

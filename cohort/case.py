"""One case: its image and its label travel together (as torchio's Subject with a ScalarImage and a LabelMap)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Volume

LABEL_CHANNEL = "label"


@dataclass(frozen=True)
class Case:
    """An image Volume (one channel per modality) and its label Volume (one channel, "label") on the same grid.

    Read from a manifest with cohort.manifest.read_case; built from arrays with Case.from_arrays.
    """

    case_id: str
    image: Volume
    label: Volume

    def __post_init__(self):
        if self.label.channels != (LABEL_CHANNEL,):
            raise ValueError(f"case {self.case_id}: the label Volume must have the one channel {LABEL_CHANNEL!r}, "
                             f"got {self.label.channels}")
        if self.label.shape != self.image.shape or not np.allclose(self.label.affine, self.image.affine, atol=1e-3):
            raise ValueError(f"case {self.case_id}: label grid {self.label.shape} differs from the image grid "
                             f"{self.image.shape} (shape or affine)")

    @classmethod
    def from_arrays(cls, case_id: str, image: Volume, label_map: np.ndarray) -> "Case":
        """A case from an image Volume and a (X, Y, Z) label map on its grid."""
        return cls(str(case_id), image, Volume(np.asarray(label_map)[None], image.affine, (LABEL_CHANNEL,)))

    @property
    def label_map(self) -> np.ndarray:
        """The (X, Y, Z) label array."""
        return self.label.data[0]

    @property
    def affine(self) -> np.ndarray:
        return self.image.affine

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image.shape

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.image.spacing

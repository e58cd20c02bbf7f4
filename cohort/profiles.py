"""Named preprocessing profiles: the voxel grid every case of a cohort is brought to."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError
from .labels import MODALITIES


@dataclass(frozen=True)
class Profile:
    name: str
    shape: tuple[int, int, int]          # voxels, RAS order
    spacing: tuple[float, float, float]  # mm
    modalities: tuple[str, ...]
    description: str = ""


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("tiny", (16, 20, 16), (9.0, 9.0, 9.0), MODALITIES,
            "unit tests only: seconds per training step"),
    Profile("demo", (32, 40, 32), (4.5, 4.5, 4.5), MODALITIES,
            "the CPU demo: whole study in about 20 minutes on 2 cores (144 x 180 x 144 mm field of view)"),
    Profile("paper-brats", (192, 192, 144), (1.0, 1.0, 1.0), MODALITIES,
            "the paper's BraTS model: 4 modalities, NCR/ED/ET/brain condition (shape-checked, not trained here)"),
    Profile("paper-wholehead", (128, 128, 128), (1.5, 1.5, 1.5), ("t1",),
            "the paper's whole-head model: 1 modality, head + tumour condition (shape-checked, not trained here)"),
)}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown profile {name!r}; known: {sorted(PROFILES)}", kind="bad-profile") from None

"""Named preprocessing profiles: the voxel grid every case of a cohort is brought to."""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import ConfigError
from .labels import MODALITIES


@dataclass(frozen=True)
class Profile:
    name: str
    shape: tuple[int, int, int]          # voxels, RAS order
    spacing: tuple[float, float, float]  # mm
    modalities: tuple[str, ...]
    description: str = ""
    # How cases are brought to the grid (cohort.preprocess). Defaults: our pipeline. The authors' (their BraTS
    # preprocessing, which their published weights expect): scaling="minmax", crop="centre", reorient=False,
    # brain_label="above-min".
    scaling: str = "percentile"    # "percentile": 0.5-99.5 % -> [-1, 1] clipped | "minmax": volume min..max -> [-1, 1]
    crop: str = "brain-bbox"       # "brain-bbox": crop to the brain, then pad/crop centred | "centre": pad/crop only
    reorient: bool = True          # RAS voxel order; False keeps the source file's voxel order
    brain_label: str = "foreground"  # "foreground": cohort.preprocess.brain_foreground | "above-min": the first
    #                                  modality above its minimum after pad/crop and scaling (the authors' rule)

    def __post_init__(self):
        for name, value, known in (("scaling", self.scaling, ("percentile", "minmax")),
                                   ("crop", self.crop, ("brain-bbox", "centre")),
                                   ("brain_label", self.brain_label, ("foreground", "above-min"))):
            if value not in known:
                raise ConfigError(f"profile {self.name}: {name} must be one of {known}, not {value!r}",
                                  kind="bad-profile")


PROFILES: dict[str, Profile] = {p.name: p for p in (
    Profile("tiny", (16, 20, 16), (9.0, 9.0, 9.0), MODALITIES,
            "unit tests only: seconds per training step"),
    Profile("demo", (32, 40, 32), (4.5, 4.5, 4.5), MODALITIES,
            "the CPU demo: whole study in about 20 minutes on 2 cores (144 x 180 x 144 mm field of view)"),
    Profile("paper-brats", (192, 192, 144), (1.0, 1.0, 1.0), MODALITIES,
            "the paper's BraTS model: 4 modalities, NCR/ED/ET/brain condition (shape-checked, not trained here)"),
    Profile("paper-wholehead", (128, 128, 128), (1.5, 1.5, 1.5), ("t1",),
            "the paper's whole-head model: 1 modality, head + tumour condition (shape-checked, not trained here)"),
    Profile("authors-brats", (192, 192, 144), (1.0, 1.0, 1.0), MODALITIES,
            "the authors' BraTS preprocessing (for their published weights): source voxel order, centre crop/pad "
            "to 192x192x144, per-volume min-max to [-1, 1], brain = T1 above its minimum",
            scaling="minmax", crop="centre", reorient=False, brain_label="above-min"),
)}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ConfigError(f"unknown profile {name!r}; known: {sorted(PROFILES)}", kind="bad-profile") from None

"""Import a BraTS 2021 folder: preprocess every good case to a profile and report every bad one.

Source layout (the official BraTS 2021 training data):

    SRC/<case>/<case>_t1.nii.gz, <case>_t1ce.nii.gz, <case>_t2.nii.gz, <case>_flair.nii.gz, <case>_seg.nii.gz

BraTS labels 0/1/2/4 (4 = enhancing tumour) become ours 0/1/2/3, and the brain label 4 is derived from the
images (cohort.preprocess). Output: OUT/<case>/<case>_{modality,seg}.nii.gz plus rows in OUT/data_manifest.csv
(cohort "brats2021", source real). Each case is appended to the manifest as soon as it is written, so an
interrupted import resumes where it stopped: cases already in the manifest are skipped.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .errors import CohortError, ConfigError
from .labels import BRATS_TO_OURS, TUMOUR_LABELS
from .manifest import append_rows, load_manifest, make_row
from .nifti import check_same_geometry, read_label, read_volume, write_array, write_volume
from .preprocess import preprocess_case
from .profiles import get_profile

MANIFEST_NAME = "data_manifest.csv"
BRATS_LABELS = frozenset(BRATS_TO_OURS)
_BRATS_LUT = np.zeros(256, np.uint8)
_BRATS_LUT[list(BRATS_TO_OURS)] = list(BRATS_TO_OURS.values())


@dataclass
class ImportReport:
    """What an import did. ``bad`` holds every refused case with the error naming its file and problem."""

    manifest: Path
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the manifest (resumed import)
    bad: list[tuple[str, CohortError]] = field(default_factory=list)

    @property
    def n_usable(self) -> int:
        return len(self.imported) + len(self.skipped)

    def summary(self) -> str:
        lines = [f"{self.manifest}: imported {len(self.imported)}, already present {len(self.skipped)}, "
                 f"bad {len(self.bad)}"]
        lines += [f"  BAD {case}: {err}" for case, err in self.bad]
        return "\n".join(lines)


def assign_split(case_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a hash of (seed, case id): stable across resumed runs and folder subsets."""
    u = int.from_bytes(hashlib.sha256(f"{seed}:{case_id}".encode()).digest()[:8], "big") / 2 ** 64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def brats_case_files(case_dir: Path, modalities) -> tuple[dict[str, Path], Path]:
    """The modality files and seg file of one BraTS case folder; CohortError naming the first missing file."""
    case = case_dir.name
    images = {m: case_dir / f"{case}_{m}.nii.gz" for m in modalities}
    for m, p in images.items():
        if not p.exists():
            raise CohortError(p, f"missing modality {m} for case {case}", kind="missing-modality")
    seg = case_dir / f"{case}_seg.nii.gz"
    if not seg.exists():
        raise CohortError(seg, f"missing segmentation for case {case}", kind="missing-file")
    return images, seg


def import_brats_case(case_dir: Path, out_dir: Path, profile, *, cohort: str, split: str,
                      require_tumour: bool = True) -> dict:
    """Read, check, preprocess and write one case; return its manifest row (not yet appended)."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    case = case_dir.name
    image_paths, seg_path = brats_case_files(case_dir, profile.modalities)
    volume = read_volume(image_paths)  # shape / affine / spacing agreement between modalities
    brats_label, seg_affine = read_label(seg_path, allowed=BRATS_LABELS, require_tumour=require_tumour)
    if brats_label.shape != volume.shape:
        raise CohortError(seg_path, f"label shape {brats_label.shape} differs from image shape {volume.shape}",
                          kind="shape-mismatch")
    check_same_geometry(seg_path, seg_affine, next(iter(image_paths.values())), volume.affine)

    image, label = preprocess_case(volume, _BRATS_LUT[brats_label], profile, name=case_dir)
    if require_tumour and not np.isin(label, TUMOUR_LABELS).any():
        raise CohortError(seg_path, f"the tumour lies outside the {profile.name} field of view after cropping",
                          kind="empty-tumour")

    manifest = out_dir / MANIFEST_NAME
    written = write_volume(image, {m: out_dir / case / f"{case}_{m}.nii.gz" for m in image.channels})
    seg_out = write_array(out_dir / case / f"{case}_seg.nii.gz", label, image.affine)
    return make_row(manifest, case_id=case, cohort=cohort, source="real", split=split, images=written,
                    label=seg_out, shape=image.shape, spacing=image.spacing)


def import_brats(src: str | Path, out_dir: str | Path, profile: str = "paper-brats", split_seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, *, cohort: str = "brats2021",
                 require_tumour: bool = True) -> ImportReport:
    """Import every case folder of ``src``; a bad case is reported (never raised) and the others go on.

    Returns an ImportReport (manifest path, imported, skipped and bad cases). Raises CohortError only when
    ``src`` itself is unusable (missing, or no case folders) or the existing manifest is unreadable, and
    ConfigError for an unknown profile or bad split fractions.
    """
    src, out_dir = Path(src), Path(out_dir)
    prof = get_profile(profile)
    if not src.is_dir():
        raise CohortError(src, "BraTS source folder does not exist", kind="missing-file")
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be in [0, 1)",
                          kind="bad-argument")
    case_dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        raise CohortError(src, "no case folders found (expected SRC/<case>/<case>_t1.nii.gz ...)",
                          kind="missing-file")
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST_NAME
    done = set(load_manifest(manifest)["case_id"]) if manifest.exists() else set()
    report = ImportReport(manifest)

    bar = tqdm(case_dirs, desc=f"import BraTS -> {prof.name}", unit="case")
    for case_dir in bar:
        case = case_dir.name
        if case in done:
            report.skipped.append(case)
            continue
        split = assign_split(case, split_seed, val_fraction, test_fraction)
        try:
            row = import_brats_case(case_dir, out_dir, prof, cohort=cohort, split=split,
                                    require_tumour=require_tumour)
            append_rows(manifest, [row])  # atomic; committed per case so the import is resumable
        except CohortError as e:
            report.bad.append((case, e))
        except Exception as e:  # a case that breaks preprocessing must not stop the other cases
            report.bad.append((case, CohortError(case_dir, f"preprocessing failed ({type(e).__name__}: {e})",
                                                 kind="preprocess-failed")))
        else:
            report.imported.append(case)
        bar.set_postfix(ok=report.n_usable, bad=len(report.bad))
    return report

"""Import a cohort from a source folder: preprocess every good case to a profile and report every bad one.

Source layouts (cohort.layouts; docs/brats.md): BraTS 2021 (SRC/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz,
labels 0/1/2/4), BraTS 2023/2024 (SRC/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz, labels 0/1/2/3), the Medical
Segmentation Decathlon's Task01_BrainTumour (4-D images + dataset.json) and nnU-Net v2 raw datasets. Source
labels become ours (0 background, 1 NCR, 2 ED, 3 ET) and the brain label 4 is derived from the images
(cohort.preprocess). Output: OUT/<case>/<case>_{modality,seg}.nii.gz plus rows in OUT/data_manifest.csv
(source real). Each case is appended to the manifest as soon as it is written (in case order, also with
several worker processes), so an interrupted import resumes where it stopped: cases already in the manifest
are skipped.
"""
from __future__ import annotations

import hashlib
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from core.errors import InputError, ConfigError
from .labels import TUMOUR_LABELS
from .case_list import read_case_list, write_record
from .layouts import CaseSource, default_cohort_name, list_cases
from .manifest import append_rows, load_manifest, make_row
from .nifti import check_same_geometry, read_label, read_volume, write_array, write_volume
from .preprocess import preprocess_case
from .profiles import get_profile

MANIFEST_NAME = "data_manifest.csv"


@dataclass
class ImportReport:
    """What an import did. ``bad`` holds every refused case with the error naming its file and problem."""

    manifest: Path
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already in the manifest (resumed import)
    bad: list[tuple[str, InputError]] = field(default_factory=list)

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


def check_case_files(case: CaseSource) -> None:
    """InputError naming the first missing file of a case."""
    for m, source in case.images.items():
        p = Path(source[0] if isinstance(source, tuple) else source)
        if not p.exists():
            raise InputError(p, f"missing modality {m} for case {case.case_id}", kind="missing-modality")
    if not case.label.exists():
        raise InputError(case.label, f"missing segmentation for case {case.case_id}", kind="missing-file")


def _refuse_constant_channels(volume, case: CaseSource) -> None:
    """A constant modality carries no image (and would divide by zero in the intensity scaling)."""
    for m in volume.channels:
        ch = volume.channel(m)
        lo = float(ch.min())
        if lo == float(ch.max()):
            source = case.images[m]
            path, what = (source[0], f"channel {source[1]} ({m})") if isinstance(source, tuple) else (source, m)
            raise InputError(path, f"modality {what} is constant (every voxel = {lo:g})", kind="constant-image")


def import_case(case: CaseSource, out_dir: Path, profile, *, cohort: str, split: str,
                require_tumour: bool = True) -> dict:
    """Read, check, preprocess and write one case; return its manifest row (not yet appended)."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    check_case_files(case)
    images = {m: case.images[m] for m in profile.modalities if m in case.images}
    volume = read_volume(images)  # shape / affine / spacing agreement between modalities
    _refuse_constant_channels(volume, case)
    src_label, seg_affine = read_label(case.label, allowed=frozenset(case.label_map))
    lut = np.zeros(256, np.uint8)
    lut[list(case.label_map)] = list(case.label_map.values())
    label = lut[src_label]
    if require_tumour and not np.isin(label, TUMOUR_LABELS).any():
        raise InputError(case.label, "no tumour voxels (NCR, ED or ET) where a tumour is required",
                          kind="empty-tumour")
    if label.shape != volume.shape:
        raise InputError(case.label, f"label shape {label.shape} differs from image shape {volume.shape}",
                          kind="shape-mismatch")
    check_same_geometry(case.label, seg_affine, case.files[0], volume.affine)

    cid = case.case_id
    image, label = preprocess_case(volume, label, profile, name=case.where)
    if require_tumour and not np.isin(label, TUMOUR_LABELS).any():
        raise InputError(case.label, f"the tumour lies outside the {profile.name} field of view after cropping",
                          kind="empty-tumour")

    manifest = out_dir / MANIFEST_NAME
    written = write_volume(image, {m: out_dir / cid / f"{cid}_{m}.nii.gz" for m in image.channels})
    seg_out = write_array(out_dir / cid / f"{cid}_seg.nii.gz", label, image.affine)
    return make_row(manifest, case_id=cid, cohort=cohort, source="real", split=split, images=written,
                    label=seg_out, shape=image.shape, spacing=image.spacing)


def import_brats_case(case_dir: Path, out_dir: Path, profile, *, cohort: str, split: str,
                      require_tumour: bool = True, layout: str = "brats2021") -> dict:
    """import_case for one BraTS case folder (layout brats2021 or brats2023)."""
    case_dir = Path(case_dir)
    prof = get_profile(profile) if isinstance(profile, str) else profile
    _, cases = list_cases(case_dir.parent, layout, modalities=prof.modalities)
    case = next(c for c in cases if c.case_id == case_dir.name)
    return import_case(case, Path(out_dir), prof, cohort=cohort, split=split, require_tumour=require_tumour)


def _import_task(case: CaseSource, out_dir: Path, profile, cohort: str, split: str, require_tumour: bool):
    """One case, never raising: (case id, row or None, InputError or None). Runs in a worker process too."""
    try:
        return case.case_id, import_case(case, out_dir, profile, cohort=cohort, split=split,
                                         require_tumour=require_tumour), None
    except InputError as e:
        return case.case_id, None, e
    except Exception as e:  # a case that breaks preprocessing must not stop the other cases
        return case.case_id, None, InputError(case.where, f"preprocessing failed ({type(e).__name__}: {e})",
                                               kind="preprocess-failed")


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: intra-op threads would only compete


def import_cohort(src: str | Path, out_dir: str | Path, layout: str = "auto", profile: str = "paper-brats",
                  split_seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, *,
                  cohort: str | None = None, require_tumour: bool = True, channel_map=None, label_map=None,
                  workers: int = 1, cases_from: str | Path | None = None) -> ImportReport:
    """Import every case of ``src`` (layout 'auto' or one of cohort.layouts.LAYOUTS); a bad case is reported
    (never raised) and the others go on.

    channel_map / label_map: the user's mapping of source channels / label values to ours ("0=t1,1=t1ce",
    a JSON file or a dict; see cohort.layouts). workers: processes preprocessing cases in parallel (1: in this
    process); the parent alone appends to the manifest, in case order, so appends stay atomic and resumable.
    cases_from: a case list (cohort.case_list): only its cases are imported, an ID ``src`` does not hold is refused,
    and the list's sha256 is recorded in out_dir/case_list.json.
    Returns an ImportReport. Raises InputError only when ``src`` itself is unusable (missing, unknown layout,
    unmapped channels or labels, no cases) or the existing manifest is unreadable, and ConfigError for an unknown
    profile, bad split fractions or workers < 1.
    """
    src, out_dir = Path(src), Path(out_dir)
    prof = get_profile(profile) if isinstance(profile, str) else profile
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ConfigError(f"val_fraction {val_fraction} + test_fraction {test_fraction} must be in [0, 1)",
                          kind="bad-argument")
    if int(workers) < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}", kind="bad-argument")
    layout, cases = list_cases(src, layout, modalities=prof.modalities, channel_map=channel_map,
                               label_map=label_map)
    cohort = cohort or default_cohort_name(src, layout)
    subset = None
    if cases_from is not None:
        subset = read_case_list(cases_from)
        subset.check_known([c.case_id for c in cases], str(src))
        cases = [c for c in cases if c.case_id in set(subset.case_ids)]
    out_dir.mkdir(parents=True, exist_ok=True)
    if subset is not None:
        write_record(out_dir, subset)
    manifest = out_dir / MANIFEST_NAME
    done = set(load_manifest(manifest)["case_id"]) if manifest.exists() else set()
    report = ImportReport(manifest)
    report.skipped = [c.case_id for c in cases if c.case_id in done]
    todo = [c for c in cases if c.case_id not in done]
    args = [(c, out_dir, prof, cohort, assign_split(c.case_id, split_seed, val_fraction, test_fraction),
             require_tumour) for c in todo]

    bar = tqdm(total=len(cases), initial=len(report.skipped), desc=f"import {layout} -> {prof.name}", unit="case")
    pool = None
    if int(workers) > 1 and len(todo) > 1:
        # spawn, not fork: a forked child of a process that already ran torch's OpenMP pool can hang
        pool = ProcessPoolExecutor(min(int(workers), len(todo)), mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_worker_init)
        results = (f.result() for f in [pool.submit(_import_task, *a) for a in args])
    else:
        results = (_import_task(*a) for a in args)
    try:
        for case_id, row, err in results:  # in case order: the manifest does not depend on the worker count
            if row is not None:
                try:
                    append_rows(manifest, [row])  # atomic; committed per case so the import is resumable
                except InputError as e:
                    err = e
            if err is None:
                report.imported.append(case_id)
            else:
                report.bad.append((case_id, err))
            bar.update()
            bar.set_postfix(ok=report.n_usable, bad=len(report.bad))
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return report


def import_brats(src: str | Path, out_dir: str | Path, profile: str = "paper-brats", split_seed: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.2, *, cohort: str = "brats2021",
                 require_tumour: bool = True, workers: int = 1, layout: str = "brats2021") -> ImportReport:
    """import_cohort for a BraTS 2021 folder (the original verb; ``layout`` may name another layout)."""
    return import_cohort(src, out_dir, layout, profile, split_seed, val_fraction, test_fraction, cohort=cohort,
                         require_tumour=require_tumour, workers=workers)

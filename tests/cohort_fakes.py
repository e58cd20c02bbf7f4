"""Builders of small fake cohorts for the cohort/ tests (toy cases from conftest.make_toy_case)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import make_toy_case

TINY_AFFINE = np.diag([9.0, 9.0, 9.0, 1.0])
TINY_AFFINE[:3, 3] = [-72.0, -90.0, -72.0]


def write_mixed_cohort(root: Path, n_real: int = 6, n_synth: int = 2, n_test: int = 1, seed: int = 0,
                       prefix: str = "") -> Path:
    """A manifest of real train cases r000.., synthetic cases s000.. (train) and real test cases t000.."""
    from cohort.manifest import append_rows, make_row
    from cohort.nifti import write_array

    manifest = root / "data_manifest.csv"
    rng = np.random.default_rng(seed)
    rows = []
    specs = [(f"{prefix}r{i:03d}", "real", "train") for i in range(n_real)] + \
            [(f"{prefix}s{i:03d}", "synthetic", "train") for i in range(n_synth)] + \
            [(f"{prefix}t{i:03d}", "real", "test") for i in range(n_test)]
    for cid, source, split in specs:
        images, label = make_toy_case(rng)
        paths = {m: write_array(root / cid / f"{cid}_{m}.nii.gz", a, TINY_AFFINE) for m, a in images.items()}
        lpath = write_array(root / cid / f"{cid}_seg.nii.gz", label, TINY_AFFINE)
        extra = dict(parent_case_id="r000", mask_edit="none", generator_checkpoint="0" * 64, sampler="ddim",
                     steps=10, seed=1) if source == "synthetic" else {}
        rows.append(make_row(manifest, case_id=cid, cohort="toy", source=source, split=split, images=paths,
                             label=lpath, shape=label.shape, spacing=(9.0, 9.0, 9.0), **extra))
    append_rows(manifest, rows)
    return manifest


def write_brats_case(src: Path, case: str, rng: np.random.Generator, shape=(24, 28, 20),
                     spacing=(6.0, 6.0, 6.0)) -> dict[str, Path]:
    """One fake case in the BraTS 2021 layout (labels 0/1/2/4, ET = 4), LPS-like affine as in the real data.

    Returns {modality|'seg': path}.
    """
    from cohort.nifti import write_array

    images, label = make_toy_case(rng, shape)
    brats = np.zeros_like(label)
    brats[label == 1] = 1
    brats[label == 2] = 2
    brats[label == 3] = 4  # BraTS stores enhancing tumour as 4; brain (our 4) is not labelled in BraTS
    # BraTS files are stored with a flipped x/y (LPS) affine; preprocessing must reorient them to RAS
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    out = {}
    for m, a in images.items():
        scanner = (a + 1.0) * 500.0 * (label > 0) + rng.uniform(0, 5, a.shape) * (label == 0)  # scanner units
        out[m] = write_array(src / case / f"{case}_{m}.nii.gz", scanner.astype(np.float32), affine)
    out["seg"] = write_array(src / case / f"{case}_seg.nii.gz", brats, affine)
    return out

"""Toy data for benchmarks and tests: a BraTS-like case as arrays, and one written in the BraTS 2021 layout
(tests/conftest.py and tests/cohort_fakes.py take them from here, so the tests and the benchmarks time the same
cases)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def make_toy_case(rng: np.random.Generator, shape=(16, 20, 16)):
    """One case: ellipsoid brain (label 4) holding a spherical tumour (NCR core, ET rim, ED halo).

    Contrast follows BraTS directions: ED bright on T2/FLAIR, ET bright on T1CE, NCR dark on T1.
    Returns ({modality: float32 array}, uint8 label).
    """
    X, Y, Z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    c = np.array(shape) / 2
    brain = ((X - c[0]) / (shape[0] * 0.42)) ** 2 + ((Y - c[1]) / (shape[1] * 0.42)) ** 2 + \
            ((Z - c[2]) / (shape[2] * 0.42)) ** 2 <= 1
    tc = c + rng.uniform(-2, 2, 3)
    r = np.sqrt((X - tc[0]) ** 2 + (Y - tc[1]) ** 2 + (Z - tc[2]) ** 2)
    rad = rng.uniform(2.0, 3.5)
    label = np.zeros(shape, np.uint8)
    label[brain] = 4
    label[brain & (r <= rad + 2)] = 2
    label[brain & (r <= rad)] = 3
    label[brain & (r <= rad * 0.5)] = 1
    base = {"t1": 0.2, "t1ce": 0.2, "t2": -0.2, "flair": -0.1}
    lut = {  # mean intensity per label (0..4) per modality, in [-1, 1]
        "t1": [-1, -0.6, 0.0, 0.1, 0.2], "t1ce": [-1, -0.5, 0.1, 0.9, 0.2],
        "t2": [-1, 0.7, 0.8, 0.3, -0.2], "flair": [-1, 0.2, 0.8, 0.4, -0.1]}
    images = {}
    for m in base:
        img = np.asarray(lut[m], np.float32)[label]
        img = img + (label > 0) * rng.normal(0, 0.05, shape).astype(np.float32)
        images[m] = np.clip(img, -1, 1).astype(np.float32)
    return images, label


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

"""Shared fixtures. `toy_cohort` is a tiny hand-made BraTS-like cohort for unit tests of every package
(the real embedded cohort is cohort.phantom; this one is faster and needs no atlas wheels)."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def one_torch_thread():
    """One intra-op torch thread inside a test (restored afterwards): CI's 2 cores are shared by parallel jobs,
    and two spinning OpenMP threads per job make small convolutions many times slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


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


@pytest.fixture(scope="session")
def toy_cohort(tmp_path_factory):
    """Path to a data_manifest.csv of 10 toy cases at the 'tiny' profile: 6 train, 2 val, 2 test."""
    from cohort.manifest import append_rows, make_row
    from cohort.nifti import write_array

    root = tmp_path_factory.mktemp("toy_cohort")
    manifest = root / "data_manifest.csv"
    rng = np.random.default_rng(0)
    affine = np.diag([9.0, 9.0, 9.0, 1.0])
    affine[:3, 3] = [-72.0, -90.0, -72.0]
    rows = []
    for i in range(10):
        split = "train" if i < 6 else ("val" if i < 8 else "test")
        images, label = make_toy_case(rng)
        cid = f"toy_{i:03d}"
        paths = {m: write_array(root / cid / f"{cid}_{m}.nii.gz", a, affine) for m, a in images.items()}
        lpath = write_array(root / cid / f"{cid}_seg.nii.gz", label, affine)
        rows.append(make_row(manifest, case_id=cid, cohort="toy", source="real", split=split,
                             images=paths, label=lpath, shape=label.shape, spacing=(9.0, 9.0, 9.0)))
    append_rows(manifest, rows)
    return manifest

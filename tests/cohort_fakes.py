"""Builders of small fake cohorts for the cohort/ tests (toy cases from bench.toy_data.make_toy_case)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from bench.toy_data import make_toy_case, write_brats_case  # noqa: F401  (write_brats_case: re-exported)

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


# --- one case written in each source layout (cohort.layouts) ----------------------------------------------------

BRATS2023_SUFFIX = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
# MSD Task01_BrainTumour: channel order and label values as its dataset.json gives them
MSD_MODALITY = {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
MSD_LABELS = {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
# an nnU-Net dataset of a user's own making: one channel and one label name nobody could guess
NNUNET_CHANNELS = {"0": "T2", "1": "FLAIR", "2": "CE", "3": "T1"}
NNUNET_LABELS = {"background": 0, "edema": 1, "enhancing": 2, "core": 3}
NNUNET_MAPS = {"channel_map": "2=t1ce", "label_map": "core=NCR"}


def _to_source(label: np.ndarray, values: dict[int, int]) -> np.ndarray:
    """Our label (0..4; brain 4 is not stored in sources) in a source convention {ours: source value}."""
    out = np.zeros(label.shape, np.uint8)
    for ours, src_value in values.items():
        out[label == ours] = src_value
    return out


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def write_layout_case(root: Path, layout: str, case: str, rng: np.random.Generator, shape=(24, 28, 20),
                      spacing=(6.0, 6.0, 6.0), msd_modality: dict | None = None) -> dict[str, Path]:
    """One toy case (same voxels for the same rng state) in a source layout: brats2021, brats2023, msd or nnunet,
    with that layout's file names, label values, channel order (MSD: one 4-D image) and dataset.json.
    Returns {modality|'seg': path}; for msd every modality maps to the one 4-D file."""
    images, label = make_toy_case(rng, shape)
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS-like, as BraTS stores it
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    scanner = {m: ((a + 1.0) * 500.0 * (label > 0) + rng.uniform(0, 5, a.shape) * (label == 0)).astype(np.float32)
               for m, a in images.items()}
    out: dict[str, Path] = {}
    if layout in ("brats2021", "brats2023"):
        sep, suffix, et = ("_", {}, 4) if layout == "brats2021" else ("-", BRATS2023_SUFFIX, 3)
        for m, a in scanner.items():
            out[m] = _save_nifti(root / case / f"{case}{sep}{suffix.get(m, m)}.nii.gz", a, affine)
        out["seg"] = _save_nifti(root / case / f"{case}{sep}seg.nii.gz", _to_source(label, {1: 1, 2: 2, 3: et}),
                                 affine)
    elif layout == "msd":
        modality = msd_modality or MSD_MODALITY
        ours = {"flair": "flair", "t1w": "t1", "t1gd": "t1ce", "t2w": "t2"}
        order = [ours[modality[str(i)].lower()] for i in range(4)]
        path = _save_nifti(root / "imagesTr" / f"{case}.nii.gz", np.stack([scanner[m] for m in order], -1), affine)
        out = {m: path for m in order}
        out["seg"] = _save_nifti(root / "labelsTr" / f"{case}.nii.gz", _to_source(label, {2: 1, 1: 2, 3: 3}), affine)
        meta = {"name": "BRATS", "tensorImageSize": "4D", "modality": modality, "labels": MSD_LABELS}
        _add_to_dataset_json(root, meta, "training",
                             {"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})
    elif layout == "nnunet":
        for idx, name in NNUNET_CHANNELS.items():
            m = {"T2": "t2", "FLAIR": "flair", "CE": "t1ce", "T1": "t1"}[name]
            out[m] = _save_nifti(root / "imagesTr" / f"{case}_{int(idx):04d}.nii.gz", scanner[m], affine)
        out["seg"] = _save_nifti(root / "labelsTr" / f"{case}.nii.gz", _to_source(label, {2: 1, 3: 2, 1: 3}), affine)
        meta = {"channel_names": NNUNET_CHANNELS, "labels": NNUNET_LABELS, "file_ending": ".nii.gz"}
        _add_to_dataset_json(root, meta, "numTraining", None)
    else:
        raise ValueError(layout)
    return out


def _add_to_dataset_json(root: Path, meta: dict, list_key: str, entry) -> None:
    import json

    path = root / "dataset.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    if entry is None:
        meta[list_key] = old.get(list_key, 0) + 1
    else:
        meta[list_key] = old.get(list_key, []) + [entry]
    path.write_text(json.dumps(meta, indent=2))

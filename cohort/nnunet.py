"""Export a manifest subset as an nnU-Net v2 raw dataset (Dataset<ID>_<name>/).

Layout written (nnU-Net v2 "raw" convention, documentation/dataset_format.md):

    Dataset<ID>_<name>/
      imagesTr/<case>_0000.nii.gz ...   one file per modality, channel order = ``modalities``
      labelsTr/<case>.nii.gz            tumour labels 0 bg, 1 NCR, 2 ED, 3 ET (our brain label 4 -> 0)
      imagesTs/<case>_0000.nii.gz ...   test cases (labels, for convenience, in labelsTs/; nnU-Net ignores it)
      dataset.json                      channel_names, labels, numTraining, file_ending (+ our provenance)
      splits_final.json                 folds; validation holds ONLY real cases, synthetic cases only train
      case_map.csv                      nnU-Net case name -> manifest case_id, source, subset

nnU-Net labels must be consecutive, and the segmenter's task is tumour segmentation, so the brain label (4,
a conditioning aid for Med-DDPM) becomes background in the export. nnU-Net's planner copies
splits_final.json from the raw folder to nnUNet_preprocessed/ itself (nnunetv2 >= 2.6), so the split travels
with the dataset.

The whole dataset folder is built beside its final place and renamed into place at the end: a reader sees
either the previous export or the complete new one, never a mix (a stale case left in imagesTr would break
nnU-Net's numTraining check).
"""
from __future__ import annotations

import json
import re
from collections import Counter
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from core.errors import InputError, ConfigError
from core.fsutil import atomic_write_text, default_mode
from .labels import BRAIN, ED, ET, NCR, REGIONS
from .manifest import check_row_hashes, check_rows, load_manifest, read_case, row_modalities
from .nifti import write_array

FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "NCR": NCR, "ED": ED, "ET": ET}
# nnU-Net region training: regions are trained as overlapping sigmoid outputs and turned back into a label map
# by painting them in regions_class_order: WT -> ED, then TC -> NCR, then ET -> ET (later regions win).
REGION_LABELS = {"background": 0, "WT": list(REGIONS["WT"]), "TC": list(REGIONS["TC"]), "ET": list(REGIONS["ET"])}
REGIONS_CLASS_ORDER = [ED, NCR, ET]
LABEL_MAPPING = {0: 0, NCR: NCR, ED: ED, ET: ET, BRAIN: 0}
_LABEL_LUT = np.zeros(256, np.uint8)
_LABEL_LUT[list(LABEL_MAPPING)] = list(LABEL_MAPPING.values())


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def nnunet_case_name(case_id: str) -> str:
    """A file-name-safe nnU-Net case identifier (letters, digits, '-', '_'); readable, close to the case id."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(case_id)).strip("_") or "case"


def _unique_names(case_ids: Sequence[str]) -> dict[str, str]:
    names: dict[str, str] = {}
    used: set[str] = set()
    for cid in case_ids:
        base = nnunet_case_name(cid)
        n, k = base, 1
        while n in used:  # two case ids that sanitise to the same name
            n, k = f"{base}_{k}", k + 1
        used.add(n)
        names[cid] = n
    return names


def _check_ids(manifest: Path, df: pd.DataFrame, ids: Sequence[str], what: str) -> None:
    dup = sorted(c for c, n in Counter(ids).items() if n > 1)
    if dup:
        raise InputError(manifest, f"{what}: case ids listed twice {dup}", kind="duplicate-case")
    unknown = sorted(set(ids) - set(df["case_id"]))
    if unknown:
        raise InputError(manifest, f"{what}: case ids not in the manifest {unknown[:10]}", kind="unknown-case")


def make_splits(names_by_source: dict[str, str], val_names: Sequence[str] | None = None, n_folds: int = 5,
                seed: int = 0) -> list[dict[str, list[str]]]:
    """nnU-Net splits_final.json content. Validation folds are drawn from real cases only.

    names_by_source: nnU-Net case name -> "real" | "synthetic", for every training case.
    val_names: if given, a single fold 0 with exactly these (real) validation cases.
    Otherwise min(n_folds, n_real) folds over the real cases (seeded permutation); synthetic cases are in the
    training part of every fold.
    """
    real = sorted(n for n, s in names_by_source.items() if s == "real")
    if val_names is not None:
        val = sorted(val_names)
        return [{"train": sorted(n for n in names_by_source if n not in set(val)), "val": val}]
    if len(real) < 2:
        raise ValueError(f"need at least 2 real training cases to make validation folds, got {len(real)}")
    k = min(n_folds, len(real))
    perm = [real[i] for i in np.random.default_rng(seed).permutation(len(real))]
    folds = []
    for chunk in np.array_split(np.array(perm, dtype=object), k):
        val = sorted(chunk.tolist())
        folds.append({"train": sorted(n for n in names_by_source if n not in set(val)), "val": val})
    return folds


def _check_dataset_name(dataset_id: int, name: str) -> None:
    if not 1 <= dataset_id <= 999:
        raise ConfigError(f"nnU-Net dataset id must be 1..999, got {dataset_id}", kind="bad-argument")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
        raise ConfigError(f"dataset name {name!r} must be letters, digits, '-' or '_'", kind="bad-argument")


def _check_selection(manifest: Path, rows: pd.DataFrame, tr_all: list[str], test_ids: list[str],
                     val_list: list[str] | None) -> None:
    """Known, unique, disjoint case ids; images to export; only real cases for validation and test."""
    _check_ids(manifest, rows, tr_all, "training cases")
    _check_ids(manifest, rows, test_ids, "test cases")
    if not tr_all:
        raise InputError(manifest, "no training cases selected for the nnU-Net export", kind="empty-selection")
    overlap = sorted(set(tr_all) & set(test_ids))
    if overlap:
        raise InputError(manifest, f"cases in both training and test sets {overlap[:10]}", kind="bad-split")
    for cid in tr_all + test_ids:
        if rows.loc[cid, "source"] not in ("real", "synthetic"):
            raise InputError(manifest, f"case {cid}: source {rows.loc[cid, 'source']!r} has no image to export",
                              kind="bad-source")
    for cid in test_ids + (val_list or []):
        if rows.loc[cid, "source"] != "real":
            raise InputError(manifest, f"case {cid} is {rows.loc[cid, 'source']}: only real cases may be used "
                                        "for validation or test", kind="bad-split")


def _check_modalities(manifest: Path, rows: pd.DataFrame, case_ids: list[str], modalities: list[str]) -> None:
    for cid in case_ids:
        missing = [m for m in modalities if m not in row_modalities(rows.loc[cid])]
        if missing:
            raise InputError(manifest, f"case {cid}: missing modality {missing} needed by the export "
                                        f"(channels {modalities})", kind="missing-modality")


def _dataset_folder(out_root: Path, dataset_id: int, name: str) -> Path:
    """The dataset's final folder; refuses a dataset id that another dataset in out_root already uses."""
    final = out_root / dataset_folder_name(dataset_id, name)
    out_root.mkdir(parents=True, exist_ok=True)
    clash = [p.name for p in out_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p != final]
    if clash:
        raise InputError(out_root / clash[0], f"nnU-Net dataset id {dataset_id} is already used by {clash}; "
                                               "pick another --id", kind="id-clash")
    return final


def _write_cases(work: Path, manifest: Path, rows: pd.DataFrame, jobs: list[tuple[str, str, str]],
                 names: dict[str, str], modalities: list[str], verify_hashes: bool, desc: str) -> list[dict]:
    """Write each (case id, image folder, label folder) job's channels and nnU-Net labels; return case_map rows."""
    map_rows = []
    for cid, img_dir, lab_dir in tqdm(jobs, desc=desc, unit="case"):
        row = rows.loc[cid]
        if verify_hashes:
            check_row_hashes(manifest, row)
        case = read_case(manifest, row)
        n = names[cid]
        for k, m in enumerate(modalities):
            write_array(work / img_dir / f"{n}_{k:04d}{FILE_ENDING}", case.image.channel(m), case.affine)
        write_array(work / lab_dir / f"{n}{FILE_ENDING}", _LABEL_LUT[case.label_map], case.affine)
        map_rows.append({"nnunet_case": n, "case_id": cid, "source": row["source"], "subset": img_dir})
    (work / "imagesTs").mkdir(exist_ok=True)  # nnU-Net expects the folder even with no test cases
    return map_rows


def _dataset_json(name: str, manifest: Path, modalities: list[str], n_training: int, n_real: int,
                  regions: bool) -> dict:
    dataset_json = {
        "name": name,
        "description": f"exported by cohort.nnunet from {manifest.name}; brain label 4 mapped to background",
        "channel_names": {str(k): m for k, m in enumerate(modalities)},
        "labels": REGION_LABELS if regions else LABELS,
        "numTraining": n_training,
        "file_ending": FILE_ENDING,
        "medddpm_label_mapping": {str(k): v for k, v in LABEL_MAPPING.items()},
        "medddpm_n_real": int(n_real),
        "medddpm_n_synthetic": n_training - int(n_real),
    }
    if regions:
        dataset_json["regions_class_order"] = REGIONS_CLASS_ORDER
    return dataset_json


def _swap_into_place(work: Path, final: Path) -> None:
    """Rename the finished folder to ``final``; a previous export is removed only after that."""
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.rename(old / final.name)
    work.chmod(default_mode(is_dir=True))  # mkdtemp made it private
    work.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_nnunet(manifest: str | Path, out_root: str | Path, dataset_id: int, name: str,
                  train_ids: Sequence[str], test_ids: Sequence[str] = (), *,
                  modalities: Sequence[str] | None = None, val_ids: Sequence[str] | None = None,
                  n_folds: int = 5, split_seed: int = 0, regions: bool = False,
                  verify_hashes: bool = True) -> Path:
    """Write ``out_root/Dataset<ID>_<name>/`` for nnU-Net v2 and return that folder.

    train_ids: manifest case ids for imagesTr/labelsTr (real and synthetic; source=mask rows are refused).
    test_ids: real case ids for imagesTs (+ labelsTs).
    modalities: channel order; default: the modalities of the first training case (all cases must have them).
    val_ids: real case ids for a single validation fold 0 (added to imagesTr if not in train_ids);
        default: ``min(n_folds, n_real)`` folds over the real training cases, seeded by ``split_seed``.
    regions: write WT/TC/ET region labels + regions_class_order (nnU-Net region training) instead of classes.
    Raises InputError for unknown, duplicate or unsuitable case ids and for any bad file (hash, geometry ...),
    ConfigError for a bad dataset id or name.
    """
    manifest = Path(manifest)
    out_root = Path(out_root)
    df = load_manifest(manifest)
    check_rows(df, manifest)  # unique case ids, known sources/splits
    dataset_id = int(dataset_id)
    _check_dataset_name(dataset_id, name)

    train_ids = [str(c) for c in train_ids]
    test_ids = [str(c) for c in test_ids]
    val_list = None if val_ids is None else [str(c) for c in val_ids]
    tr_all = train_ids + [c for c in (val_list or []) if c not in set(train_ids)]
    rows = df.set_index("case_id", drop=False)
    _check_selection(manifest, rows, tr_all, test_ids, val_list)
    modalities = list(row_modalities(rows.loc[tr_all[0]]) if modalities is None else modalities)
    _check_modalities(manifest, rows, tr_all + test_ids, modalities)
    final = _dataset_folder(out_root, dataset_id, name)

    names = _unique_names(tr_all + test_ids)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=out_root))
    try:
        jobs = [(cid, "imagesTr", "labelsTr") for cid in tr_all] + [(cid, "imagesTs", "labelsTs") for cid in test_ids]
        map_rows = _write_cases(work, manifest, rows, jobs, names, modalities, verify_hashes,
                                desc=f"nnU-Net export {final.name}")
        n_real = sum(rows.loc[c, "source"] == "real" for c in tr_all)
        atomic_write_text(work / "dataset.json",
                          json.dumps(_dataset_json(name, manifest, modalities, len(tr_all), n_real, regions), indent=2))
        by_source = {names[c]: str(rows.loc[c, "source"]) for c in tr_all}
        try:
            splits = make_splits(by_source, None if val_list is None else [names[c] for c in val_list],
                                 n_folds=n_folds, seed=split_seed)
        except ValueError as e:
            raise InputError(manifest, f"cannot build nnU-Net validation folds: {e}", kind="bad-split") from e
        atomic_write_text(work / "splits_final.json", json.dumps(splits, indent=2))
        atomic_write_text(work / "case_map.csv", pd.DataFrame(map_rows).to_csv(index=False))
        _swap_into_place(work, final)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return final


def load_case_map(dataset_dir: str | Path) -> pd.DataFrame:
    """The nnU-Net case name -> manifest case id table written by export_nnunet."""
    return pd.read_csv(Path(dataset_dir) / "case_map.csv", dtype=str)

"""data_manifest.csv: one row per case, paths relative to the manifest's folder (the data root).

Schema: docs/manifest.md. Loading, validation, atomic append and merge are done with pandas.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .case import Case
from core.errors import InputError
from core.fsutil import atomic_path, sha256_bytes, sha256_file
from .labels import MODALITIES

FILE_COLUMNS = (*MODALITIES, "label")
HASH_COLUMNS = tuple(f"sha256_{c}" for c in FILE_COLUMNS)
SYNTHETIC_COLUMNS = ("parent_case_id", "mask_edit", "generator_checkpoint", "sampler", "steps", "seed")
COLUMNS = ("case_id", "cohort", "source", "split", *FILE_COLUMNS, "shape", "spacing", *HASH_COLUMNS,
           *SYNTHETIC_COLUMNS)
# a reference manifest (the repository's data_manifest.csv) may also record each file's sha256 of its NIfTI content
# (nifti_sha256_<file>: decompressed), so that the same data gzipped by another zlib is still recognised as the same
NIFTI_HASH_COLUMNS = tuple(f"nifti_sha256_{c}" for c in FILE_COLUMNS)
SOURCES = ("real", "synthetic", "mask")  # "mask": a conditioning mask without image (e.g. an edited mask)
SPLITS = ("train", "val", "test")


def format_shape(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def format_spacing(spacing) -> str:
    return "x".join(f"{float(s):.4g}" for s in spacing)


def empty_manifest() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="string") for c in COLUMNS})


def _normalise(df: pd.DataFrame) -> pd.DataFrame:
    for c in COLUMNS:
        if c not in df.columns:
            df[c] = pd.NA
    extra = [c for c in df.columns if c not in COLUMNS]
    df = df[list(COLUMNS) + extra].astype("string")
    return df


def load_manifest(path: str | Path) -> pd.DataFrame:
    """Read a manifest (all columns as strings; missing optional columns added empty)."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "manifest does not exist", kind="missing-file")
    try:
        df = pd.read_csv(path, dtype="string", keep_default_na=False, na_values=[""])
    except Exception as e:
        raise InputError(path, f"not a readable CSV ({e})", kind="unreadable") from e
    missing = [c for c in ("case_id", "cohort", "source", "split", "label") if c not in df.columns]
    if missing:
        raise InputError(path, f"missing required columns {missing}", kind="bad-manifest")
    return _normalise(df)


def resolve(manifest_path: str | Path, rel: str) -> Path:
    """Resolve a manifest path, refusing anything that escapes the data root (the manifest's folder)."""
    root = Path(manifest_path).resolve().parent
    if rel is None or pd.isna(rel) or str(rel) == "":
        raise InputError(manifest_path, "empty path in manifest", kind="missing-file")
    p = Path(str(rel))
    if p.is_absolute():
        raise InputError(manifest_path, f"path {rel!r} is absolute; manifest paths must be relative to the data root",
                          kind="path-escape")
    full = (root / p).resolve()
    if full != root and root not in full.parents:
        raise InputError(manifest_path, f"path {rel!r} escapes the data root {root}", kind="path-escape")
    return full


def relative_to_root(manifest_path: str | Path, file_path: str | Path) -> str:
    root = Path(manifest_path).resolve().parent
    full = Path(file_path).resolve()
    if root not in full.parents:
        raise InputError(file_path, f"file lies outside the data root {root}", kind="path-escape")
    return full.relative_to(root).as_posix()


def row_files(row: pd.Series) -> dict[str, str]:
    """The file columns of a row that are filled in: modality names and 'label'."""
    return {c: row[c] for c in FILE_COLUMNS if c in row and not pd.isna(row[c]) and str(row[c]) != ""}


def row_modalities(row: pd.Series) -> list[str]:
    return [m for m in MODALITIES if m in row and not pd.isna(row[m]) and str(row[m]) != ""]


def check_rows(df: pd.DataFrame, where: str | Path) -> None:
    """Schema-level checks that need no file access."""
    dup = df["case_id"][df["case_id"].duplicated()].unique().tolist()
    if dup:
        raise InputError(where, f"duplicate case ids {dup}", kind="duplicate-case")
    for i, row in df.iterrows():
        cid = row["case_id"]
        if pd.isna(cid) or str(cid) == "":
            raise InputError(where, f"row {i} has no case_id", kind="bad-manifest")
        if row["source"] not in SOURCES:
            raise InputError(where, f"case {cid}: source {row['source']!r} not in {SOURCES}", kind="bad-manifest")
        if row["split"] not in SPLITS:
            raise InputError(where, f"case {cid}: split {row['split']!r} not in {SPLITS}", kind="bad-manifest")
        if pd.isna(row["label"]):
            raise InputError(where, f"case {cid}: no label path", kind="missing-file")
        if row["source"] in ("real", "synthetic") and not row_modalities(row):
            raise InputError(where, f"case {cid}: no modality path (need at least one of {MODALITIES})",
                              kind="missing-modality")
        if row["source"] == "synthetic":
            for c in ("parent_case_id", "generator_checkpoint", "sampler", "steps", "seed"):
                if pd.isna(row[c]) or str(row[c]) == "":
                    raise InputError(where, f"synthetic case {cid}: column {c} is empty", kind="bad-manifest")


def validate_manifest(path: str | Path, *, check_files: bool = True, check_hashes: bool = True,
                      require_tumour: bool = False) -> pd.DataFrame:
    """Validate a manifest and (optionally) every file it names; raise InputError on the first problem.

    File checks: readable 3-D NIfTI, finite, modalities share shape/affine/spacing, label on the same grid
    with values in the convention, hashes as recorded.
    """
    from .nifti import check_same_geometry, read_array, read_label

    path = Path(path)
    df = load_manifest(path)
    check_rows(df, path)
    if not check_files:
        return df
    for _, row in df.iterrows():
        files = row_files(row)
        resolved = {k: resolve(path, v) for k, v in files.items()}
        if check_hashes:
            check_row_hashes(path, row)
        lab, lab_aff = read_label(resolved["label"], require_tumour=require_tumour)
        for m in row_modalities(row):
            arr, aff = read_array(resolved[m])
            if arr.shape != lab.shape:
                raise InputError(resolved[m], f"image shape {arr.shape} differs from label shape {lab.shape}",
                                  kind="shape-mismatch")
            check_same_geometry(resolved[m], aff, resolved["label"], lab_aff)
    return df


def check_row_hashes(manifest_path: str | Path, row: pd.Series) -> None:
    """Refuse a row whose files are missing or whose sha256 no longer matches the recorded one."""
    for k, v in row_files(row).items():
        p = resolve(manifest_path, v)
        want = row.get(f"sha256_{k}")
        if want is None or pd.isna(want) or str(want) == "":
            continue
        if not p.exists():
            raise InputError(p, f"file named in {Path(manifest_path).name} (case {row['case_id']}) does not exist",
                              kind="missing-file")
        got = sha256_file(p)
        if got != want:
            raise InputError(p, f"sha256 {got[:12]}… no longer matches the manifest ({want[:12]}…)",
                              kind="hash-mismatch")


def damaged_files(manifest_path: str | Path, df: pd.DataFrame | None = None,
                  sha256=sha256_file) -> list[tuple[str, Path, str]]:
    """Every (case_id, file, problem) of a manifest whose file is missing or no longer has its recorded sha256
    (check_row_hashes' check, but listing all of them instead of stopping at the first): what a resume must not
    reuse and `medddpm verify` reports. Rows without a recorded hash are not checked."""
    df = load_manifest(manifest_path) if df is None else df
    out = []
    for _, row in df.iterrows():
        for k, v in row_files(row).items():
            want = row.get(f"sha256_{k}")
            if want is None or pd.isna(want) or str(want) == "":
                continue
            p = resolve(manifest_path, v)
            if not p.exists():
                out.append((str(row["case_id"]), p, "missing"))
            elif sha256(p) != want:
                out.append((str(row["case_id"]), p, f"sha256 differs from the manifest's ({str(want)[:12]}…)"))
    return out


def nifti_sha256(path: str | Path) -> str:
    """sha256 of a NIfTI file's content (cohort.nifti.nifti_bytes): the same for the same header and voxels, whatever
    gzip wrote them."""
    from .nifti import nifti_bytes  # here, not at the top: nibabel stays out of what imports the manifest alone

    return sha256_bytes(nifti_bytes(path))


def with_nifti_hashes(manifest: str | Path) -> pd.DataFrame:
    """The manifest with nifti_sha256_<file> beside each sha256_<file>: what a reference manifest records so that
    check_same_cohort recognises the same data compressed by another zlib (scripts/write_reference_manifest.py)."""
    df = load_manifest(manifest)
    for c in FILE_COLUMNS:
        df[f"nifti_sha256_{c}"] = [nifti_sha256(resolve(manifest, row[c])) if c in row_files(row) else pd.NA
                                   for _, row in df.iterrows()]
    return df.astype("string")


def check_same_cohort(manifest: str | Path, reference: str | Path) -> list[Path]:
    """Refuse a manifest that does not describe the same data as ``reference`` (e.g. the repository's
    data_manifest.csv of the embedded default cohort): the same case ids and, per case, the same value in every
    column (files, their sha256, split, shape, ...). Row order does not matter. Only the recorded rows are
    compared; that the files still match their recorded sha256 is ``validate_manifest``'s check.

    Where the reference also records a file's NIfTI content hash (NIFTI_HASH_COLUMNS) and the file's sha256 differs,
    the file is decompressed and its content compared instead: gzip's bytes depend on the zlib Python is built with
    (zlib-ng, as some Linux distributions ship, compresses to other bytes than zlib), the header and voxels do not.

    Raises InputError(manifest, ..., kind="cohort-mismatch") naming the first differing case (and file), with
    what to do. Returns the files that hold the reference's content in other gzip bytes (none with the same zlib).
    """
    manifest, reference = Path(manifest), Path(reference)
    df, ref = load_manifest(manifest), load_manifest(reference)

    def mismatch(problem: str) -> InputError:
        return InputError(manifest, f"{problem}; this is not the data of {reference}. Rebuild (or copy) the cohort "
                                   "into a new, empty folder with the pinned environment (make env) and compare "
                                   "again", kind="cohort-mismatch")

    check_rows(ref, reference)  # unique case ids, known sources/splits
    check_rows(df, manifest)
    missing = [c for c in ref["case_id"] if c not in set(df["case_id"].tolist())]
    if missing:
        raise mismatch(f"case {missing[0]} is missing ({len(missing)} of the reference's {len(ref)} cases are)")
    extra = [c for c in df["case_id"] if c not in set(ref["case_id"].tolist())]
    if extra:
        raise mismatch(f"case {extra[0]} is not in the reference ({len(extra)} extra cases)")
    mine = df.set_index("case_id", drop=False).fillna("")
    columns = [c for c in list(ref.columns) + [c for c in df.columns if c not in ref.columns]
               if c not in NIFTI_HASH_COLUMNS]  # recorded by a reference only: compared below, by content
    recompressed = []
    for _, want in ref.fillna("").iterrows():
        cid, got = want["case_id"], mine.loc[want["case_id"]]
        for c in columns:
            w, g = want.get(c, ""), got.get(c, "")
            if w == g:
                continue
            if not c.startswith("sha256_"):
                raise mismatch(f"case {cid}: {c} is {g!r}, the reference {w!r}")
            key = c[len("sha256_"):]
            problem = f"case {cid}: file {got.get(key, '')} has sha256 {g[:12]}…, the reference {w[:12]}…"
            content = want.get(f"nifti_sha256_{key}", "")
            if not content or not got.get(key, ""):
                raise mismatch(problem)
            path = resolve(manifest, got[key])
            if nifti_sha256(path) != content:
                raise mismatch(f"{problem}, and its NIfTI content (header or voxels) differs too")
            recompressed.append(path)
    return recompressed


def write_manifest(df: pd.DataFrame, path: str | Path) -> None:
    """Atomically (re)write a whole manifest."""
    df = _normalise(df.copy())
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)


def append_rows(path: str | Path, rows: Iterable[dict] | pd.DataFrame, *,
                current: pd.DataFrame | None = None) -> pd.DataFrame:
    """Append rows to a manifest atomically; refuse duplicate case ids (nothing is written then).

    Creates the manifest if it does not exist. Returns the new manifest. ``current``: the manifest as it is on disk
    (what load_manifest or the previous append_rows returned), from a caller that is the file's only writer and
    appends many times (synth.synthesize, once per batch): it is not read and parsed again.
    """
    path = Path(path)
    new = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    new = _normalise(new)
    if current is not None:
        old = current
    else:
        old = load_manifest(path) if path.exists() else None  # None: a new manifest, the rows are all of it
    check_rows(new, path)
    for c in FILE_COLUMNS:  # a row may only name files inside the data root
        for v in new[c].dropna():
            resolve(path, v)
    clash = sorted(set(old["case_id"]) & set(new["case_id"])) if old is not None else []
    if clash:
        raise InputError(path, f"duplicate case ids {clash} already in the manifest; nothing appended",
                          kind="duplicate-case")
    merged = pd.concat([old, new], ignore_index=True) if old is not None and len(old) else new
    write_manifest(merged, path)
    return merged


def merge_manifests(paths: list[str | Path], out: str | Path) -> pd.DataFrame:
    """Merge manifests into ``out``, rebasing each file path onto out's folder. Duplicate ids are refused."""
    out = Path(out)
    frames = []
    for p in paths:
        df = load_manifest(p)
        for c in FILE_COLUMNS:
            df[c] = [pd.NA if pd.isna(v) else os.path.relpath(resolve(p, v), out.resolve().parent) for v in df[c]]
        frames.append(df)
    merged = pd.concat(frames, ignore_index=True)
    for c in FILE_COLUMNS:  # after rebasing, every path must still be inside out's data root
        for v in merged[c].dropna():
            resolve(out, v)
    check_rows(merged, out)
    write_manifest(merged, out)
    return merged


@dataclass(frozen=True)
class CaseFiles:
    """Resolved absolute file paths of one manifest row."""

    case_id: str
    images: dict[str, Path]
    label: Path


def case_files(manifest_path: str | Path, row: pd.Series) -> CaseFiles:
    files = {k: resolve(manifest_path, v) for k, v in row_files(row).items()}
    label = files.pop("label")
    return CaseFiles(str(row["case_id"]), files, label)


def make_row(manifest_path: str | Path, *, case_id: str, cohort: str, source: str, split: str,
             images: dict[str, str | Path], label: str | Path, shape, spacing, **extra) -> dict:
    """Build a manifest row from absolute file paths: relative paths, shape, spacing and hashes filled in."""
    row: dict = {"case_id": case_id, "cohort": cohort, "source": source, "split": split,
                 "shape": format_shape(shape), "spacing": format_spacing(spacing)}
    for name, p in {**images, "label": label}.items():
        row[name] = relative_to_root(manifest_path, p)
        row[f"sha256_{name}"] = sha256_file(p)
    for k, v in extra.items():
        row[k] = None if v is None else str(v)
    return row


def read_case(manifest_path: str | Path, row: pd.Series) -> Case:
    """Read one case: image Volume (its modalities) and label Volume (uint8) on one checked grid."""
    from .nifti import check_same_geometry, read_label, read_volume

    cf = case_files(manifest_path, row)
    vol = read_volume(cf.images)
    lab, lab_aff = read_label(cf.label)
    if lab.shape != vol.shape:
        raise InputError(cf.label, f"label shape {lab.shape} differs from image shape {vol.shape}",
                          kind="shape-mismatch")
    check_same_geometry(cf.label, lab_aff, next(iter(cf.images.values())), vol.affine)
    return Case.from_arrays(cf.case_id, vol, lab)


def select(df: pd.DataFrame, *, source: str | Iterable[str] | None = None, split: str | Iterable[str] | None = None,
           cohort: str | Iterable[str] | None = None) -> pd.DataFrame:
    """Rows whose source, split and cohort are the given value, or one of the given values (None: any)."""
    m = np.ones(len(df), dtype=bool)
    for column, wanted in (("source", source), ("split", split), ("cohort", cohort)):
        if wanted is not None:
            values = [wanted] if isinstance(wanted, str) else list(wanted)
            m &= df[column].isin(values).to_numpy(dtype=bool, na_value=False)
    return df[m]

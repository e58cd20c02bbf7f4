"""Stage a cohort inside another folder (a study's): hard links where the file system allows, else copies.

A study keeps its real and synthetic rows in one manifest, and manifest paths may not leave their data root
(cohort.manifest.resolve), so a user's cohort that lives elsewhere is brought inside the study folder first.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from core.errors import InputError
from .manifest import check_rows, load_manifest, resolve, row_files, write_manifest


def stage_cohort(manifest: str | Path, out_dir: str | Path) -> Path:
    """Link (or copy) every file of ``manifest`` to the same relative path under ``out_dir`` and write the
    manifest there; returns out_dir/data_manifest.csv. Files already staged with the same size are kept, so an
    interrupted staging resumes; each file appears atomically (linked or copied to a temporary name, renamed)."""
    src = Path(manifest)
    df = load_manifest(src)
    check_rows(df, src)
    out = Path(out_dir)
    for _, row in df.iterrows():
        for rel in row_files(row).values():
            s, d = resolve(src, rel), (out / rel).resolve()
            if out.resolve() not in d.parents:
                raise InputError(src, f"path {rel!r} would leave the staged cohort folder", kind="path-escape")
            if d.exists() and d.stat().st_size == s.stat().st_size:
                continue
            d.parent.mkdir(parents=True, exist_ok=True)
            tmp = d.with_name(f".{d.name}.stage.tmp")
            tmp.unlink(missing_ok=True)
            try:
                os.link(s, tmp)
            except OSError:  # another file system, or links not allowed: copy
                shutil.copy2(s, tmp)
            os.replace(tmp, d)
    target = out / "data_manifest.csv"
    write_manifest(df, target)
    return target

"""Curated case lists (`--cases-from FILE`): one case ID per line, '#' starts a comment, blank lines ignored.

The paper's BraTS model was trained on 193 hand-picked cases; a study on a named subset records the list's
sha256 so the subset can be told apart from the full cohort and from another list.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from core.errors import InputError
from core.fsutil import atomic_write_text, sha256_file

RECORD_FILE = "case_list.json"  # beside an imported cohort's manifest, or in a training folder


@dataclass(frozen=True)
class CaseList:
    path: Path
    case_ids: tuple[str, ...]   # in file order, without duplicates
    sha256: str                 # of the file's bytes

    def record(self) -> dict:
        """What a manifest folder, a training folder or a study record keeps of the list."""
        return {"file": str(self.path), "sha256": self.sha256, "n_cases": len(self.case_ids)}

    def check_known(self, known: Iterable[str], where: str) -> None:
        """Refuse IDs of the list that ``where`` (a source folder, a manifest) does not hold, naming them all."""
        unknown = [c for c in self.case_ids if c not in set(known)]
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 20 else "")
            raise InputError(self.path, f"{len(unknown)} case ID(s) not in {where}: {shown}; fix or remove "
                                        "them from the list", kind="unknown-case")

    def select(self, df: pd.DataFrame, where: str) -> pd.DataFrame:
        """The rows of manifest ``df`` (``where``: its path) whose case_id is in the list; unknown IDs refused."""
        self.check_known(df["case_id"].astype(str).tolist(), where)
        return df[df["case_id"].isin(list(self.case_ids)).to_numpy(dtype=bool, na_value=False)]


def read_case_list(path: str | Path) -> CaseList:
    """Read a case list; an empty list (only comments) is refused."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "case list does not exist; give a text file with one case ID per line",
                         kind="missing-file")
    ids: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        cid = line.split("#", 1)[0].strip()
        if cid and cid not in ids:
            ids.append(cid)
    if not ids:
        raise InputError(path, "case list names no case; write one case ID per line ('#' starts a comment)",
                         kind="empty-cohort")
    return CaseList(path, tuple(ids), sha256_file(path))


def write_subset(manifest: str | Path, cases: CaseList) -> Path:
    """The rows of ``manifest`` listed in ``cases`` (unknown IDs refused), written beside it (same data root, so its
    relative paths hold) as cases_<first 12 hex digits of the list's sha256>.csv; returns that path."""
    from .manifest import load_manifest, write_manifest

    out = Path(manifest).parent / f"cases_{cases.sha256[:12]}.csv"
    write_manifest(cases.select(load_manifest(manifest), str(manifest)), out)
    return out


def write_record(folder: str | Path, cases: CaseList) -> Path:
    """folder/case_list.json (atomic). A folder already recorded with another list is refused: mixing two
    subsets in one cohort or run would leave neither recorded."""
    out = Path(folder) / RECORD_FILE
    if out.exists():
        old = json.loads(out.read_text())
        if old.get("sha256") != cases.sha256:
            raise InputError(out, f"this folder was made with another case list ({old.get('file')}, sha256 "
                                  f"{str(old.get('sha256'))[:12]}…); use a new --out folder for {cases.path}",
                             kind="config-mismatch")
        return out
    atomic_write_text(out, json.dumps({**cases.record(), "case_ids": list(cases.case_ids)}, indent=1) + "\n")
    return out

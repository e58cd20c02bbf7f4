"""Registry of the synthetic cohorts of a study folder: STUDY/synthetic/registry.json.

Every synthetic cohort (the study's pools and each regenerate-cohort version) has an entry: id, manifest,
sha256, checkpoint, seed, creation time and ``used_by`` (the finished studies that trained on it).
Retention prunes the oldest regenerated cohorts beyond ``keep`` but never one that a study used.
STUDY/synthetic/data_manifest.csv is rebuilt after every change: all registered cohorts in one manifest.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import shutil
from pathlib import Path
from typing import Iterator

from core.errors import InputError, ConfigError
from core.fsutil import atomic_write_text

REGISTRY = Path("synthetic") / "registry.json"
REGISTRY_MANIFEST = Path("synthetic") / "data_manifest.csv"


@contextlib.contextmanager
def locked_registry(study_dir: str | Path) -> Iterator[dict]:
    """Read-modify-write the registry under an exclusive lock (a nightly regeneration may overlap a study)."""
    path = Path(study_dir) / REGISTRY
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:  # "a": never touch the lock file's content or mtime
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = read_registry(study_dir)
        before = json.dumps(data, sort_keys=True)
        yield data
        if json.dumps(data, sort_keys=True) != before:
            atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_registry(study_dir: str | Path) -> dict:
    path = Path(study_dir) / REGISTRY
    if not path.exists():
        return {"cohorts": []}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(path, f"registry is not valid JSON ({e})", kind="unreadable") from e
    if not isinstance(data.get("cohorts"), list):
        raise InputError(path, "registry has no 'cohorts' list", kind="bad-manifest")
    return data


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def register(study_dir: str | Path, cohort_id: str, manifest: str | Path, sha256: str, kind: str,
             **info) -> dict:
    """Add (or refresh) a cohort entry. Re-registering the same id keeps its creation time and usage."""
    study_dir = Path(study_dir).resolve()
    rel = Path(manifest).resolve().relative_to(study_dir).as_posix()
    with locked_registry(study_dir) as reg:
        old = next((c for c in reg["cohorts"] if c["id"] == cohort_id), None)
        entry = {"id": cohort_id, "manifest": rel, "sha256": sha256, "kind": kind,
                 "created": old["created"] if old else _now(), "used_by": old["used_by"] if old else [], **info}
        if old:
            reg["cohorts"][reg["cohorts"].index(old)] = entry
        else:
            reg["cohorts"].append(entry)
    return entry


def mark_used(study_dir: str | Path, cohort_ids, study_key: str) -> None:
    """Record that a finished study trained on these cohorts (they are then never pruned)."""
    with locked_registry(study_dir) as reg:
        for c in reg["cohorts"]:
            if c["id"] in cohort_ids and study_key not in c["used_by"]:
                c["used_by"] = sorted([*c["used_by"], study_key])


def next_version(study_dir: str | Path, prefix: str = "regen") -> str:
    """Next free id ``<prefix>-vNNN`` (numbers never reused, even after pruning)."""
    reg = read_registry(study_dir)
    nums = [int(c["id"].rsplit("-v", 1)[1]) for c in reg["cohorts"]
            if c["id"].startswith(prefix + "-v") and c["id"].rsplit("-v", 1)[1].isdigit()]
    nums.append(int(reg.get(f"last_{prefix}", 0)))
    return f"{prefix}-v{max(nums) + 1:03d}"


def prune(study_dir: str | Path, keep: int | None, kind: str = "regenerated") -> list[str]:
    """Delete the oldest cohorts of ``kind`` beyond the newest ``keep``, except any a study used.

    Returns the pruned ids. ``keep=None`` keeps everything.
    """
    if keep is None:
        return []
    if keep < 1:
        raise ConfigError(f"retention must keep at least 1 cohort, got {keep}")
    study_dir = Path(study_dir).resolve()
    pruned = []
    with locked_registry(study_dir) as reg:
        mine = sorted((c for c in reg["cohorts"] if c["kind"] == kind), key=lambda c: (c["created"], c["id"]))
        for c in mine[:max(0, len(mine) - keep)]:
            if c["used_by"]:
                continue
            folder = (study_dir / c["manifest"]).parent
            if study_dir not in folder.parents:  # never delete outside the study folder
                raise InputError(folder, "registered cohort lies outside the study folder", kind="path-escape")
            shutil.rmtree(folder, ignore_errors=True)
            reg["cohorts"].remove(c)
            pruned.append(c["id"])
        if pruned:
            prefix = pruned[0].rsplit("-v", 1)[0]
            reg[f"last_{prefix}"] = max([int(reg.get(f"last_{prefix}", 0))] +
                                        [int(i.rsplit("-v", 1)[1]) for i in pruned if i.rsplit("-v", 1)[1].isdigit()])
    return pruned


def rebuild_manifest(study_dir: str | Path) -> Path | None:
    """Merge every registered cohort's manifest into STUDY/synthetic/data_manifest.csv (rewritten only if its
    content changes, so a rerun of a finished study leaves it untouched)."""
    import os

    from cohort.manifest import merge_manifests

    study_dir = Path(study_dir).resolve()
    reg = read_registry(study_dir)
    out = study_dir / REGISTRY_MANIFEST
    paths = [study_dir / c["manifest"] for c in reg["cohorts"]]
    if not paths:
        return None
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp.csv")  # beside out: same data root for the merged paths
    try:
        merge_manifests(paths, tmp)
        if out.exists() and out.read_bytes() == tmp.read_bytes():
            return out
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out

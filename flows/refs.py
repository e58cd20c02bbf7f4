"""What flows pass between tasks: a path plus the sha256 of its content, never arrays or models.

Prefect's INPUTS cache policy hashes task inputs as JSON, so a task whose inputs are FileRefs is cached on the
content of the files it reads (plus its parameters), not on timestamps.

A FileRef is intact when its file or folder still has the recorded content and, for a file that lists other
files with their sha256 (a data_manifest*.csv, a predictions.json index), each of those still has its recorded
sha256 too: a manifest's own bytes do not change when one of its images is damaged.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from core.fsutil import sha256_file

# temporary files of core.fsutil.atomic_path and of library checkpoints never count towards a folder's hash
_SKIP_SUFFIXES = (".tmp", ".lock")


class FileRef(BaseModel):
    """A file or folder produced by a task, identified by its content hash."""

    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    # Wall time of the task run that produced it. Excluded from the JSON dump, hence from the cache keys of
    # downstream tasks (Prefect hashes inputs as JSON), but kept in the pickled task result, so a cache hit
    # still reports how long the stage took when it really ran.
    seconds: float = Field(default=0.0, exclude=True)

    def damage(self) -> list[tuple[Path, str]]:
        """(file, problem) for everything of this result that is missing or changed since it was made: the file or
        folder itself, and the files a manifest or a predictions index lists with their sha256. [] = intact."""
        p = Path(self.path)
        try:
            if hash_path(p) != self.sha256:
                return [(p, "changed since it was made (sha256 differs from the cached result's)")]
        except FileNotFoundError:
            return [(p, "missing")]
        return listed_damage(p)

    def is_intact(self) -> bool:
        """True if the file/folder still exists with the same content, and so do the files it lists with their
        sha256 (a cached result is only reused then)."""
        return not self.damage()


def is_manifest(path: str | Path) -> bool:
    p = Path(path)
    return p.suffix == ".csv" and p.name.startswith("data_manifest")


def listed_damage(path: str | Path) -> list[tuple[Path, str]]:
    """Damage of the files that ``path`` lists with their sha256: a manifest's case files
    (cohort.manifest.damaged_files), a predictions.json index's label files (flows.tasks.predict)."""
    p = Path(path)
    if is_manifest(p):
        from cohort.manifest import damaged_files

        return [(f, f"{problem} (case {cid} of {p})") for cid, f, problem in damaged_files(p, sha256=file_sha256)]
    if p.name == "predictions.json":
        out = []
        for cid, entry in json.loads(p.read_text()).items():
            f = p.parent / entry["file"]
            if not f.exists():
                out.append((f, f"missing (prediction of {cid} in {p})"))
            elif file_sha256(f) != entry["sha256"]:
                out.append((f, f"sha256 differs from {p}'s"))
        return out
    return []


def damaged_refs(result) -> list[tuple[Path, str]]:
    """The damage of every FileRef inside a task or flow result (a FileRef, or lists/tuples/dicts of them)."""
    if isinstance(result, FileRef):
        return result.damage()
    if isinstance(result, dict):
        return [d for v in result.values() for d in damaged_refs(v)]
    if isinstance(result, (list, tuple)):
        return [d for v in result for d in damaged_refs(v)]
    return []


# sha256 of files already hashed by this process, keyed by (path, inode, size, mtime): a study checks the same
# cohort files at several stages; a file rewritten or damaged since has another size or mtime and is hashed again
_hashed: dict[tuple, str] = {}


def file_sha256(path: str | Path) -> str:
    p = Path(path)
    st = os.stat(p)
    key = (str(p.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _hashed:
        _hashed[key] = sha256_file(p)
    return _hashed[key]


def hash_dir(path: str | Path) -> str:
    """sha256 over (relative path, file sha256) of every file below ``path``, in sorted order."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if f.name.startswith(".") and any(s in f.name for s in _SKIP_SUFFIXES):
            continue
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + file_sha256(f).encode() + b"\n")
    return h.hexdigest()


def hash_path(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return hash_dir(p)
    if not p.exists():
        raise FileNotFoundError(p)
    return file_sha256(p)


def ref(path: str | Path, seconds: float = 0.0) -> FileRef:
    """FileRef of an existing file or folder (absolute path)."""
    p = Path(path).resolve()
    try:
        sha256 = hash_path(p)
    except FileNotFoundError:
        from core.errors import InputError

        raise InputError(p, "does not exist (a file this run was given or a stage should have written)",
                         kind="missing-file") from None
    return FileRef(path=str(p), sha256=sha256, seconds=round(float(seconds), 3))

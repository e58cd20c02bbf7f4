"""What flows pass between tasks: a path plus the sha256 of its content, never arrays or models.

Prefect's INPUTS cache policy hashes task inputs as JSON, so a task whose inputs are FileRefs is cached on the
content of the files it reads (plus its parameters), not on timestamps.
"""
from __future__ import annotations

import hashlib
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

    def is_intact(self) -> bool:
        """True if the file/folder still exists with the same content (a cached result is only reused then)."""
        try:
            return hash_path(self.path) == self.sha256
        except FileNotFoundError:
            return False


def hash_dir(path: str | Path) -> str:
    """sha256 over (relative path, file sha256) of every file below ``path``, in sorted order."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(root)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        if f.name.startswith(".") and any(s in f.name for s in _SKIP_SUFFIXES):
            continue
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def hash_path(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():
        return hash_dir(p)
    if not p.exists():
        raise FileNotFoundError(p)
    return sha256_file(p)


def ref(path: str | Path, seconds: float = 0.0) -> FileRef:
    """FileRef of an existing file or folder (absolute path)."""
    p = Path(path).resolve()
    return FileRef(path=str(p), sha256=hash_path(p), seconds=round(float(seconds), 3))


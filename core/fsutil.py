"""File helpers used across packages: atomic writes (text, CSV, bytes, torch states), content hashes, CSV logs."""
from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def default_mode(is_dir: bool = False) -> int:
    """The permission bits a plain open()/mkdir() would give (temporary files/dirs are created private)."""
    return (0o777 if is_dir else 0o666) & ~_UMASK


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a partial file: either the old file or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # keep the real suffix(es) so libraries that dispatch on extension (nibabel .nii.gz) still work
    suffix = "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the result the mode a plain open() would (others may need to read data)
        os.chmod(tmp_path, default_mode())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_csv(path: str | Path, rows: list[dict], fieldnames) -> None:
    """Write dict rows as CSV atomically (training logs and the like)."""
    import csv
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fieldnames))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_torch_save(obj, path: str | Path) -> Path:
    """torch.save to a temporary name, then rename (training states; load them with weights_only=True)."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def read_csv_log(path: str | Path, key: str, upto: int) -> list[dict]:
    """Rows of a CSV log (training loss logs) whose integer column ``key`` is <= ``upto``: what a run resumed at
    ``upto`` keeps. Rows that do not parse (a line cut by a kill) are dropped; a missing file gives []."""
    import csv
    import io

    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for r in csv.DictReader(io.StringIO(path.read_text())):
        try:
            if int(r[key]) <= upto:
                rows.append(dict(r))
        except (KeyError, TypeError, ValueError):
            continue
    return rows


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

"""One run owns a folder at a time: an advisory lock on a study folder or a `train` / `synthesize` output folder.

    with folder_lock(study, wait=0):      # wait: seconds, None = until it is free; 0 = refuse at once
        ...                               # a second run gets FolderBusy: "F is in use by host pid N since T; ..."

The lock is filelock's (flock on a file FOLDER/.medddpm.lock, released by the kernel when its process dies, even by
SIGKILL). Who holds it is written beside it, in FOLDER/.medddpm.lock.json (host, pid, start time), because the
lock file itself is opened (and truncated) by every process that tries it. A run that finds an owner record whose
process is gone (same host) takes the folder over with a warning naming that run, so the user learns that a run
was killed there. The lock is re-entrant within a process: the CLI holds it and the flow it calls takes it again.
Both files start with "." and contain ".lock", which flows.refs skips when it hashes a folder.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import socket
import threading
import warnings
from pathlib import Path
from typing import Iterator

from .errors import MedDDPMError
from .fsutil import atomic_write_text

LOCK_NAME = ".medddpm.lock"
OWNER_NAME = ".medddpm.lock.json"

# folders this process holds: resolved path -> [FileLock, depth]
_held: dict[str, list] = {}
_held_guard = threading.Lock()


class FolderBusy(MedDDPMError):
    """Another run owns the folder. ``str(err)``: who, since when, and what to do."""

    def __init__(self, folder: str | Path, owner: dict | None, waited: float | None):
        self.folder, self.owner = str(folder), owner or {}
        who = (f"{self.owner.get('host', '?')} pid {self.owner.get('pid', '?')} since {self.owner.get('since', '?')}"
               if owner else "another run (no owner record yet)")
        after = f" (waited {waited:g} s)" if waited else ""
        super().__init__(f"{folder} is in use by {who}{after}; wait for that run to finish (--wait SECONDS, or "
                         "--wait unlimited) or use another folder")

    def __reduce__(self):
        return type(self), (self.folder, self.owner, None)


class FolderTakenOver(UserWarning):
    """A run found the owner record of a run that is gone (killed) and took the folder over."""


def _names(name: str) -> tuple[str, str]:
    """The lock and owner file names of the whole folder ("") or of one part of it (e.g. a synthesis shard)."""
    return (LOCK_NAME, OWNER_NAME) if not name else (f".medddpm-{name}.lock", f".medddpm-{name}.lock.json")


def read_owner(folder: str | Path, name: str = "") -> dict | None:
    """The owner record of a folder (host, pid, since, command), or None if there is none or it is unreadable."""
    try:
        return json.loads((Path(folder) / _names(name)[1]).read_text())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).astimezone().isoformat(timespec="seconds")


@contextlib.contextmanager
def folder_lock(folder: str | Path, wait: float | None = 0, what: str = "", name: str = "") -> Iterator[dict]:
    """Hold ``folder``'s lock for the block (the folder is created). ``wait``: seconds to wait for another run to
    finish (None: as long as it takes; 0: refuse at once) before raising FolderBusy. ``what``: a word for the owner
    record (e.g. "medddpm study"). ``name``: lock one part of the folder instead (e.g. "shard-0-of-4": shards of one
    synthesis share the folder). Yields the owner record written."""
    from filelock import FileLock, Timeout

    root = Path(folder).resolve()
    lock_name, owner_name = _names(name)
    key = f"{root}:{name}"
    with _held_guard:
        if key in _held:  # this process holds it already (the CLI around the flow): re-entrant
            _held[key][1] += 1
            nested = True
        else:
            nested = False
    if nested:
        try:
            yield read_owner(root, name) or {}
        finally:
            with _held_guard:
                _held[key][1] -= 1
        return

    root.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(root / lock_name), is_singleton=False)
    try:
        lock.acquire(timeout=-1 if wait is None else max(0.0, float(wait)), poll_interval=0.5)
    except Timeout:
        raise FolderBusy(root, read_owner(root, name), wait) from None
    try:
        previous = read_owner(root, name)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": _now(), "command": what}
        if previous and previous.get("pid") != me["pid"]:
            same_host = previous.get("host") == me["host"]
            if not same_host or not _alive(int(previous.get("pid", -1))):
                warnings.warn(f"{root}: the previous run ({previous.get('command') or 'a run'} on "
                              f"{previous.get('host')} pid {previous.get('pid')}, since {previous.get('since')}) "
                              "ended without releasing the folder (killed, or out of memory); taking it over and "
                              "resuming where it stopped", FolderTakenOver, stacklevel=3)
        atomic_write_text(root / owner_name, json.dumps(me) + "\n")
        with _held_guard:
            _held[key] = [lock, 1]
        try:
            yield me
        finally:
            with _held_guard:
                _held.pop(key, None)
            with contextlib.suppress(OSError):
                (root / owner_name).unlink()
    finally:
        lock.release()


def parse_wait(text: str | None) -> float | None:
    """--wait's value: seconds, or "unlimited" (None: wait as long as it takes). Absent: 0 (refuse at once)."""
    from .errors import ConfigError

    if text is None:
        return 0.0
    if str(text).strip().lower() in ("unlimited", "forever", "inf"):
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise ConfigError(f"--wait takes seconds or 'unlimited', not {text!r}") from None
    if seconds < 0:
        raise ConfigError(f"--wait takes seconds >= 0 or 'unlimited', not {text!r}")
    return seconds

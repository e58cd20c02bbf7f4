"""The one exception type for bad input: its message always names the file and the problem."""
from __future__ import annotations

from pathlib import Path


class CohortError(ValueError):
    """Bad input data. ``str(err)`` is ``"<path>: <problem>"`` so a researcher can find the file."""

    def __init__(self, path: str | Path | None, problem: str, kind: str = "invalid"):
        self.path = str(path) if path is not None else None
        self.problem = problem
        # machine-readable category, e.g. "unreadable", "not-3d", "shape-mismatch", "duplicate-case"
        self.kind = kind
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # rebuilt from (path, problem, kind) when it crosses a process boundary (import workers)
        return type(self), (self.path, self.problem, self.kind)

"""The project's exception types: bad input data (names the file) and bad settings (names the option)."""
from __future__ import annotations

from pathlib import Path


class MedDDPMError(ValueError):
    """Base of every error this project raises on purpose; the CLI prints it without a traceback."""


class InputError(MedDDPMError):
    """A file or folder that cannot be used as it is (a case, a manifest, a checkpoint, a model folder, a sample the
    gate refused). ``str(err)`` is ``"<path>: <problem>"`` so a researcher can find the file."""

    def __init__(self, path: str | Path | None, problem: str, kind: str = "invalid"):
        self.path = str(path) if path is not None else None
        self.problem = problem
        # machine-readable category, e.g. "unreadable", "not-3d", "shape-mismatch", "duplicate-case"
        self.kind = kind
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # rebuilt from (path, problem, kind) when it crosses a process boundary (import workers)
        return type(self), (self.path, self.problem, self.kind)


class ConfigError(MedDDPMError):
    """A bad setting (option, profile name, parameter combination): no file is involved, the message names the
    setting and says what is allowed."""

    def __init__(self, problem: str, kind: str = "bad-config"):
        self.path = None
        self.problem = problem
        self.kind = kind
        super().__init__(problem)

    def __reduce__(self):
        return type(self), (self.problem, self.kind)

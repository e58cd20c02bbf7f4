"""Kill-and-rerun of a `medddpm` command, for the tests that a verb killed with SIGKILL resumes to the same result
(train: tests/test_synth_pipeline.py, distill: tests/test_distill.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def medddpm_command(*args: str) -> list[str]:
    """`medddpm ARGS` run by this interpreter (the installed script may be another checkout's)."""
    return [sys.executable, "-m", "medddpm.cli", *args]


def kill_once_written(cmd: list[str], written: Path, timeout: float = 240) -> None:
    """Start ``cmd`` and SIGKILL it as soon as ``written`` exists (a first checkpoint: the kill lands mid-run).
    Fails with the command's stderr if it ends, or ``timeout`` seconds pass, before the file appears."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not written.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert written.exists(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else f"no {written}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def run_to_end(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` (e.g. the killed command again, which resumes) and assert it succeeded."""
    done = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done

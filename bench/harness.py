"""What the bench tools share: repeated timing, memory and CPU time of this process or of a command's process tree,
the default study's cases, and one segmenter trained and scored as the study does.

Timings on a shared machine are noisy: the tools print ratios measured in one run.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


# --- timing -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Timing:
    """Seconds of each timed call of one function."""

    seconds: tuple[float, ...]

    @property
    def min(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return sorted(self.seconds)[len(self.seconds) // 2]  # the upper middle of an even count


def time_calls(fn: Callable[[], object], repeat: int, warmup: int = 0) -> Timing:
    """Call ``fn`` ``warmup`` times untimed, then ``repeat`` times timed."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - t0)
    return Timing(tuple(seconds))


# --- memory and CPU time ------------------------------------------------------------------------------------------

def own_peak_rss_bytes() -> int:
    """Peak resident memory of this process so far: VmHWM of /proc/self/status on Linux, else ru_maxrss. Not
    ru_maxrss on Linux: a process started by fork + exec inherits its parent's high-water mark there (the kernel
    keeps the old mm's peak in the signal struct at exec), so a child of a large parent (a long pytest run)
    reported the parent's size as its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def cpu_seconds(children_only: bool = False) -> float:
    """User + system CPU seconds of this process and its waited-for children (the children alone if asked)."""
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = kids.ru_utime + kids.ru_stime
    if not children_only:
        me = resource.getrusage(resource.RUSAGE_SELF)
        total += me.ru_utime + me.ru_stime
    return total


@dataclass(frozen=True)
class TreeRun:
    """One command's measurement (run_measured)."""

    wall_seconds: float
    cpu_seconds: float     # user + sys of the whole process tree (getrusage counts grandchildren that were waited for)
    peak_rss_bytes: int    # the largest sum of RSS over the process and all its descendants, sampled every poll s
    returncode: int


def _tree_rss(root) -> int:
    import psutil

    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:  # gone between the listing and the read
            pass
    return total


def run_measured(cmd: list[str], poll: float = 0.1) -> TreeRun:
    """Run ``cmd`` and measure its wall time, its process tree's CPU time and peak summed RSS (psutil samples).

    The tree matters: nnU-Net, Prefect's API server and worker pools run in child processes. CPU seconds are given
    because wall time on a shared machine mostly measures the other users."""
    import psutil

    cpu0 = cpu_seconds(children_only=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _tree_rss(root))
        time.sleep(poll)
    return TreeRun(time.perf_counter() - t0, cpu_seconds(children_only=True) - cpu0, peak, proc.returncode)


# --- the default study's cases ------------------------------------------------------------------------------------

def default_study():
    """The default study's parameters (flows.plan.StudyParams with its defaults: what `make study` runs)."""
    from flows.plan import StudyParams

    return StudyParams()


def default_study_cohort(work: str | Path, progress: bool = True) -> Path:
    """Build (or reuse) the default study's phantom cohort under WORK/cohort; returns its data_manifest.csv."""
    from cohort.phantom import build_phantom_cohort

    p = default_study()
    return build_phantom_cohort(Path(work) / "cohort", n_cases=p.n_cases, seed=p.cohort_seed, profile=p.profile,
                                progress=progress)


def study_selection(cohort: str | Path, n_real: int | None = None) -> Path:
    """The real training cases the default study selects from ``cohort`` (cohort.selection with the study's seed;
    n_real: the study's unless given), written beside the cohort's manifest; returns that manifest's path."""
    from cohort.selection import write_training_selection

    p = default_study()
    return write_training_selection(cohort, p.n_real if n_real is None else n_real, p.cohort_seed)


def real_test_ids(manifest: str | Path) -> list[str]:
    """The ids of the real test cases of a cohort (the study's test set)."""
    from cohort.manifest import load_manifest, select

    return select(load_manifest(manifest), source="real", split="test")["case_id"].tolist()


def finished_study_cases(study: Path) -> tuple[list[str], list[str], list[str]]:
    """(selected real training ids, synthetic ids of the 0:1 mix, real test ids) of a finished study folder."""

    def train_ids(prefix: str) -> list[str]:
        config = next((study / "segmenters").glob(f"{prefix}-*/config.json"))
        return json.loads(config.read_text())["train_ids"]

    return train_ids("r1-s0"), train_ids("r0-s1"), real_test_ids(study / "data_manifest.csv")


def segmenter_scores(manifest: str, case_ids: list[str], test_ids: list[str], out: str, overrides: dict,
                     seed: int) -> str:
    """Train the study's default (demo) segmenter on ``case_ids`` with one torch thread, predict ``test_ids`` and
    score them (eval.segmentation); returns OUT/scores.csv. Resumable: a finished OUT is only read. A module-level
    function, so that a process pool can run several at once."""
    import torch

    torch.set_num_threads(1)
    from eval.segmentation import evaluate_predictions
    from segment.api import predict, train
    from segment.config import SegmenterConfig

    scores_csv = Path(out) / "scores.csv"
    if not scores_csv.exists():
        cfg = SegmenterConfig(**{"profile": "demo", "seed": seed, "device": "cpu", **overrides})
        model = train(manifest, case_ids, Path(out) / "model", cfg)
        preds = predict(model, manifest, test_ids, Path(out) / "pred")
        evaluate_predictions(preds, manifest).to_csv(scores_csv, index=False)
    return str(scores_csv)

"""Wall time and peak RSS of `medddpm study` (what `make study` runs), cohort build included.

    .venv/bin/python -m bench.bench_study --out runs/bench-study [--fresh] [--rerun] [-- extra study options]

Peak RSS is of the whole process tree (the flow process, Prefect's temporary API server, any worker processes),
sampled every 0.2 s with psutil and summed over the tree. Prints the targets as ratios (<= 1.0 meets them),
each serial stage's share of the first run from study.json (the rest is the segmenter stage, whose runs overlap,
startup and orchestration; the flow logs the segmenter stage's own wall time), and with --rerun the cached rerun's
time as a ratio of the first run. Writes the numbers to OUT/bench_study.json.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import psutil

from bench.harness import run_measured

TARGET_SECONDS = 20 * 60
TARGET_RSS = 6 * 2 ** 30


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-study", help="study folder")
    ap.add_argument("--fresh", action="store_true", help="delete the study folder first (cohort build included)")
    ap.add_argument("--rerun", action="store_true", help="run a second time (all cached) and report the ratio")
    ap.add_argument("extra", nargs="*", help="extra `medddpm study` options after --")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.fresh and out.exists():
        shutil.rmtree(out)
    medddpm = str(Path(sys.executable).parent / "medddpm")
    cmd = [medddpm, "study", "--out", str(out), *args.extra]
    print("command:", " ".join(cmd), flush=True)
    first = run_measured(cmd, poll=0.2)
    wall, peak, rc = first.wall_seconds, first.peak_rss_bytes, first.returncode
    if rc != 0:
        print(f"study failed with exit code {rc}", file=sys.stderr)
        return rc
    result = {"command": " ".join(cmd), "wall_seconds": round(wall, 1), "peak_rss_gib": round(peak / 2 ** 30, 3),
              "wall_vs_20min_target": round(wall / TARGET_SECONDS, 3),
              "peak_rss_vs_6gib_target": round(peak / TARGET_RSS, 3), "cpu_count": psutil.cpu_count()}
    stages = json.loads((out / "study.json").read_text()).get("wall_seconds", {})
    # the segmenter runs overlap (two at a time by default): their summed seconds are not a share of the wall time
    serial = {k: v for k, v in stages.items() if "sum over runs" not in k}
    result["stage_share_of_wall"] = {k: round(v / wall, 3) for k, v in serial.items()}
    result["segmenter_runs_summed_vs_wall"] = {k: round(v / wall, 3) for k, v in stages.items() if k not in serial}
    result["segmenter_stage_startup_and_orchestration_share"] = round(1 - sum(serial.values()) / wall, 3)
    if args.rerun:
        rerun = run_measured(cmd, poll=0.2)
        wall2, peak2, rc2 = rerun.wall_seconds, rerun.peak_rss_bytes, rerun.returncode
        result.update(rerun_wall_seconds=round(wall2, 1), rerun_vs_first=round(wall2 / wall, 3),
                      rerun_peak_rss_gib=round(peak2 / 2 ** 30, 3), rerun_rc=rc2)
    (out / "bench_study.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

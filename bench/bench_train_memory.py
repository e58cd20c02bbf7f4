"""Peak memory of Med-DDPM training vs the number of training cases: streamed (cache_rate 0, the default) and
all cases held in RAM (cache_rate 1, the earlier behaviour), in one run.

Writes max(--cases) toy cases (bench.toy_data.make_toy_case) at a cohort profile's grid into a temporary folder,
then trains a few steps on the first n of them, each (n, cache_rate) in its own subprocess, and reads that
process's peak RSS (ru_maxrss). Data workers 0, so every byte is in the measured process. Default: the
paper-wholehead grid (128³, t1 only, ~27 MB per transformed case) with a small network (8-16-16-16 channels, no
level attention; MONAI's middle block always has attention, at 1/8 = 16³ tokens here) so that a step fits on a
CPU; the data, not the network, is what differs between the runs.

    .venv/bin/python -m bench.bench_train_memory --cases 8 64 --steps 1
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.harness import own_peak_rss_bytes
from bench.toy_data import make_toy_case

ROOT = Path(__file__).resolve().parents[1]

SMALL_NETWORK = dict(channels=(8, 16, 16, 16), attention_levels=(False, False, False, False), norm_num_groups=8,
                     num_res_blocks=1, batch_size=1, grad_accum=1)


def bench_config(steps: int, cache_rate: float) -> dict:
    return {**SMALL_NETWORK, "steps": steps, "checkpoint_every": steps, "num_threads": 1,
            "progress": False, "device": "cpu", "data_workers": 0, "cache_rate": cache_rate}


def write_cases(root: Path, profile: str, n: int) -> Path:
    """A manifest of n toy cases at the profile's grid (real, train split)."""
    import numpy as np

    from cohort.manifest import append_rows, make_row
    from cohort.nifti import write_array
    from cohort.profiles import get_profile

    prof = get_profile(profile)
    manifest = root / "data_manifest.csv"
    affine = np.diag([*prof.spacing, 1.0])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        images, label = make_toy_case(rng, shape=prof.shape)
        cid = f"case_{i:03d}"
        paths = {m: write_array(root / cid / f"{cid}_{m}.nii.gz", images[m], affine) for m in prof.modalities}
        lpath = write_array(root / cid / f"{cid}_seg.nii.gz", label, affine)
        rows.append(make_row(manifest, case_id=cid, cohort="bench", source="real", split="train", images=paths,
                             label=lpath, shape=label.shape, spacing=prof.spacing))
    append_rows(manifest, rows)
    return manifest


def first_cases(manifest: Path, n: int) -> Path:
    import pandas as pd

    sub = manifest.with_name(f"manifest_{n}.csv")
    pd.read_csv(manifest).sort_values("case_id").head(n).to_csv(sub, index=False)
    return sub


def child(manifest: str, out: str, profile: str, steps: int, cache_rate: float) -> None:
    from synth.train import train_medddpm

    t0 = time.perf_counter()
    train_medddpm(manifest, profile, out, bench_config(steps, cache_rate))
    print(json.dumps({"peak_rss_mb": own_peak_rss_bytes() / 2 ** 20,
                      "seconds": time.perf_counter() - t0}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, nargs=2, default=(8, 64), help="small and large case counts")
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps per run")
    ap.add_argument("--profile", default="paper-wholehead", help="synth and cohort profile (modalities, voxel grid)")
    ap.add_argument("--child", nargs=3, metavar=("MANIFEST", "OUT", "CACHE_RATE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.profile, args.steps, float(args.child[2]))
        return
    small, large = args.cases
    with tempfile.TemporaryDirectory(prefix="bench_train_memory_") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_cases(tmp / "cohort", args.profile, large)
        print(f"{large} cases at the {args.profile} grid written in {time.perf_counter() - t0:.0f} s")
        results = {}
        for cache_rate in (0.0, 1.0):
            for n in (small, large):
                cmd = [sys.executable, "-m", "bench.bench_train_memory", "--profile", args.profile, "--steps",
                       str(args.steps), "--child", str(first_cases(manifest, n)), str(tmp / f"run_{n}_{cache_rate}"),
                       str(cache_rate)]
                done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if done.returncode:
                    sys.exit(done.stderr[-3000:])
                r = results[cache_rate, n] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"cache_rate {cache_rate:.0f}, {n:3d} cases: peak RSS {r['peak_rss_mb']:7.0f} MB, "
                      f"{r['seconds']:.0f} s", flush=True)
    print()
    print(f"| data | peak RSS, {small} cases | peak RSS, {large} cases | {large} / {small} |")
    print("|---|---|---|---|")
    for cache_rate, name in ((0.0, "streamed (cache_rate 0, default)"), (1.0, "all in RAM (cache_rate 1)")):
        a, b = results[cache_rate, small]["peak_rss_mb"], results[cache_rate, large]["peak_rss_mb"]
        print(f"| {name} | {a:.0f} MB | {b:.0f} MB | {b / a:.2f}x |")


if __name__ == "__main__":
    main()

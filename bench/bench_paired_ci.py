"""How often the study's "significant" is wrong: false-positive rate and power of the paired Δ's 95 % CI.

    .venv/bin/python -m bench.bench_paired_ci [--studies 400] [--cases 12] [--seeds 3 5]

Simulated studies like the default one (12 test cases; a reference mix and a mix with the same per-case
difficulty): Dice[case, seed] = difficulty[case] + effect + offset[seed] + noise[case, seed], with offset ~
N(0, seed_sd) one per trained segmenter (training noise that moves every test case) and noise ~ N(0, 0.02).
For each (seeds, seed_sd, effect), prints the share of studies whose CI excludes 0 with the bootstrap over test
cases alone (seeds averaged per case: the report's CI before 2026-12-02) and with eval.stats.case_seed_ci (test
cases and each mix's seeds). effect 0: false-positive rate (nominal 0.05); effect > 0: power.
seed_sd 0.02 / 0.08 are about the spread of per-seed real-only WT / TC means in the default study.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from eval.stats import bootstrap_ci, case_seed_ci


def significant(lo: float, hi: float) -> bool:
    return lo > 0 or hi < 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=400, help="simulated studies per setting")
    ap.add_argument("--cases", type=int, default=12, help="test cases per study (default study: 12)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 5], help="segmenter seeds per mix")
    ap.add_argument("--seed-sd", type=float, nargs="+", default=[0.0, 0.02, 0.08])
    ap.add_argument("--effects", type=float, nargs="+", default=[0.0, 0.05, 0.1])
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"{args.studies} simulated studies per row, {args.cases} test cases, case x seed noise sd 0.02, "
          f"{args.resamples} bootstrap resamples")
    print("| seeds per mix | seed sd | true Δ | significant: test cases only | significant: cases + seeds |")
    print("|---|---|---|---|---|")
    for k in args.seeds:
        for seed_sd in args.seed_sd:
            for effect in args.effects:
                rng = np.random.default_rng(12345)
                hits_cases = hits_two = 0
                for r in range(args.studies):
                    base = rng.uniform(0.5, 0.9, args.cases)[:, None]
                    ref = base + rng.normal(0, seed_sd, (1, k)) + rng.normal(0, 0.02, (args.cases, k))
                    mix = base + effect + rng.normal(0, seed_sd, (1, k)) + rng.normal(0, 0.02, (args.cases, k))
                    hits_cases += significant(*bootstrap_ci(mix.mean(1) - ref.mean(1), seed=r,
                                                            n_resamples=args.resamples))
                    hits_two += significant(*case_seed_ci([mix, ref], (1, -1), seed=r, n_resamples=args.resamples))
                print(f"| {k} | {seed_sd:.2f} | {effect:+.2f} | {hits_cases / args.studies:.3f} | "
                      f"{hits_two / args.studies:.3f} |", flush=True)
    print(f"({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How often the study's "significant" is wrong: false-positive rate and power of the paired Δ's 95 % interval.

    .venv/bin/python -m bench.bench_paired_ci [--studies 4000] [--cases 12 50] [--seeds 3 5 9]

Simulated studies (tests/test_eval_calibration.py has the same model and the pass/fail check):
Dice[mix, case, seed] = difficulty[case] + effect[mix] + case_x_mix[mix, case] + offset[mix, seed] + noise, with
difficulty ~ N(0, case_sd) shared by the mixes, case_x_mix and noise ~ N(0, case_sd / 2), and offset ~ N(0, seed_sd)
one per trained segmenter (training noise that moves every test case). For each setting, the share of studies whose
95 % interval excludes 0 with the interval over test cases alone (seeds averaged per case, the trained segmenters
treated as fixed) and with eval.stats.case_seed_interval (the report's: case and seed components, Satterthwaite
df), and the minimum detectable Δ (eval.stats.min_detectable_delta) of the design. effect 0: false-positive rate
(nominal 0.05); effect > 0: power. Studies are simulated as arrays, thousands at a time.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from eval.stats import VarianceComponents, case_seed_interval, min_detectable_delta


def simulate(rng, n_studies, n_cases, n_seeds, seed_sd, case_sd, effect):
    difficulty = rng.normal(0, case_sd, (n_studies, n_cases, 1))
    return [difficulty + eff + rng.normal(0, case_sd / 2, (n_studies, n_cases, 1))
            + rng.normal(0, seed_sd, (n_studies, 1, n_seeds))
            + rng.normal(0, case_sd / 2, (n_studies, n_cases, n_seeds))
            for eff in (effect, 0.0)]


def rate(ci) -> float:
    return float(np.mean((ci.low > 0) | (ci.high < 0)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=4000, help="simulated studies per setting")
    ap.add_argument("--cases", type=int, nargs="+", default=[12], help="test cases per study (default study: 12)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[3, 5, 9], help="segmenter seeds per mix")
    ap.add_argument("--seed-sd", type=float, nargs="+", default=[0.02, 0.10])
    ap.add_argument("--case-sd", type=float, nargs="+", default=[0.2])
    ap.add_argument("--effects", type=float, nargs="+", default=[0.0, 0.1])
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    print(f"{args.studies} simulated studies per row")
    print("| cases | seeds per mix | seed sd | case sd | true Δ | significant: test cases only | "
          "significant: case_seed_interval | minimum detectable Δ |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.cases:
        for k in args.seeds:
            for seed_sd in args.seed_sd:
                for case_sd in args.case_sd:
                    vc = VarianceComponents(2 * (case_sd / 2) ** 2, seed_sd ** 2, (case_sd / 2) ** 2)
                    for effect in args.effects:
                        rng = np.random.default_rng(12345)
                        mix, ref = simulate(rng, args.studies, n, k, seed_sd, case_sd, effect)
                        cases_only = case_seed_interval([mix.mean(-1, keepdims=True), ref.mean(-1, keepdims=True)],
                                                        (1, -1))
                        study = case_seed_interval([mix, ref], (1, -1))
                        print(f"| {n} | {k} | {seed_sd:.2f} | {case_sd:.2f} | {effect:+.2f} | {rate(cases_only):.3f} | "
                              f"{rate(study):.3f} | {min_detectable_delta(vc, n, k):.3f} |", flush=True)
    print(f"({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

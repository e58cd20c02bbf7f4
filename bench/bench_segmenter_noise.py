"""Training noise of the demo segmenter per recipe: per-seed Dice, seed sd and the minimum detectable Δ of the
default study's design (12 test cases x 3 seeds per mix), unpaired and paired by seed.

    nice -n 5 .venv/bin/python -m bench.bench_segmenter_noise --study runs/default-study --work W \\
        --arms 'base={}' 'ema={"ema_decay": 0.99}' --seeds 0 1 2 3 4 [--jobs 2] [--reuse-study]

Each arm is NAME=JSON (overrides of the demo segmenter config). For every arm, mix (1:0 = the study's 8 real
training cases, 0:1 = the synthetic cases made from their masks) and seed it trains the study's default segmenter
(bench.harness.segmenter_scores: one torch thread), predicts the study's real test cases and scores them. Then, per
arm and region: the per-seed mean Dice of each mix, the sd over seeds, the variance components of the study
(eval.stats.variance_components: case x mix, seed, case x seed, and the seed variance of a seed-paired difference)
and the minimum detectable Δ (80 % power, two-sided α 0.05, eval.stats.min_detectable_delta) at 12 test cases x 3
seeds, with the seeds of the two mixes analysed unpaired and paired (the same seed number = the same initial
weights, data order and augmentation draws in both mixes). CPU seconds per training are those of its worker process.
--reuse-study: the 'base' arm's seeds that the study trained are read from its results/per_case.csv (same config,
same bytes) instead of retrained. Resumable under --work.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from bench.harness import finished_study_cases, segmenter_scores

MIXES = {"1:0": (8, 0), "0:1": (0, 8)}
REGIONS = ("WT", "TC", "ET", "mean")


def timed_scores(manifest: str, case_ids: list[str], test_ids: list[str], out: str, overrides: dict,
                 seed: int) -> tuple[str, float]:
    """segmenter_scores, and the CPU seconds this worker spent on it (recorded in OUT/cpu_seconds.json on the
    first run, read back on later ones)."""
    t_file = Path(out) / "cpu_seconds.json"
    done = (Path(out) / "scores.csv").exists()
    t0 = time.process_time()
    scores = segmenter_scores(manifest, case_ids, test_ids, out, overrides, seed)
    if not done:
        t_file.write_text(json.dumps({"cpu_seconds": time.process_time() - t0}))
    return scores, _recorded_cpu(Path(out))


def _recorded_cpu(out: Path) -> float:
    t_file = out / "cpu_seconds.json"
    return json.loads(t_file.read_text())["cpu_seconds"] if t_file.exists() else float("nan")


def reuse_study_runs(study: Path, work: Path, seeds: list[int]) -> None:
    """The study's own real-only and synthetic-only scores as the 'base' arm's (no CPU time recorded)."""
    per_case = pd.read_csv(study / "results" / "per_case.csv")
    for mix in MIXES:
        for seed in seeds:
            rows = per_case[(per_case["mix"] == mix) & (per_case["seed"] == seed)]
            out = work / "base" / f"{mix.replace(':', '-')}-s{seed}"
            if len(rows) and not (out / "scores.csv").exists():
                out.mkdir(parents=True, exist_ok=True)
                rows[["case_id", "region", "dice", "hd95"]].to_csv(out / "scores.csv", index=False)


def as_per_case(scores: pd.DataFrame) -> pd.DataFrame:
    """The bench's scores in results/per_case.csv's layout (eval.stats' input), with the mean region."""
    from eval.stats import with_mean_region

    df = scores.assign(n_real=scores["mix"].map(lambda m: MIXES[m][0]),
                       n_synth=scores["mix"].map(lambda m: MIXES[m][1]), backend="monai", test_set="test")
    return with_mean_region(df[["mix", "n_real", "n_synth", "backend", "test_set", "seed", "case_id", "region",
                                "dice", "hd95"]])


def noise_table(per_case: pd.DataFrame, n_cases: int, n_seeds: int) -> pd.DataFrame:
    """Per region: seed sd of each mix, variance components, MDE unpaired and paired at n_cases x n_seeds."""
    from eval.stats import VarianceComponents, min_detectable_delta, variance_components

    vc = variance_components(per_case).set_index("region")
    per_seed = per_case.groupby(["mix", "seed", "region"])["dice"].mean()
    rows = []
    for region in REGIONS:
        r = vc.loc[region]
        comp = VarianceComponents(r["case_var"], r["seed_var"], r["residual_var"], r["seed_diff_var"],
                                  r["residual_diff_var"])
        rows.append({"region": region,
                     **{f"sd seeds {m}": per_seed.xs((m, region), level=("mix", "region")).std(ddof=1)
                        for m in MIXES},
                     "sd seeds (model)": np.sqrt(r["seed_var"]), "sd paired seed diff": np.sqrt(r["seed_diff_var"]),
                     "case x mix sd": np.sqrt(r["case_var"]), "case x seed sd": np.sqrt(r["residual_var"]),
                     "MDE unpaired": min_detectable_delta(comp, n_cases, n_seeds, paired=False),
                     "MDE paired": min_detectable_delta(comp, n_cases, n_seeds, paired=True)})
    return pd.DataFrame(rows).set_index("region")


def design_table(per_case: pd.DataFrame, cases=(12, 24, 36, 48), seeds=(3, 5)) -> pd.DataFrame:
    """Paired minimum detectable Δ per region at other designs (test cases x seeds per mix), from the measured
    components."""
    from eval.stats import VarianceComponents, min_detectable_delta, variance_components

    vc = variance_components(per_case).set_index("region")
    out = {}
    for region in REGIONS:
        r = vc.loc[region]
        comp = VarianceComponents(r["case_var"], r["seed_var"], r["residual_var"], r["seed_diff_var"],
                                  r["residual_diff_var"])
        out[region] = {f"{n} x {k}": min_detectable_delta(comp, n, k, paired=True) for k in seeds for n in cases}
    return pd.DataFrame(out).T


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, help="a finished study folder (its data_manifest.csv and segmenters/)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--arms", nargs="+", default=["base={}"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--reuse-study", action="store_true", help="read the base arm's study seeds from its results")
    ap.add_argument("--no-train", action="store_true", help="analyse the runs already finished under --work")
    ap.add_argument("--design", type=int, nargs=2, default=(12, 3), metavar=("CASES", "SEEDS"),
                    help="the design whose minimum detectable Δ is printed (default: the default study's)")
    args = ap.parse_args(argv)
    study, work = Path(args.study).resolve(), Path(args.work)
    real, synth, test = finished_study_cases(study)
    manifest = str(study / "data_manifest.csv")
    arms = dict(a.split("=", 1) for a in args.arms)
    if args.reuse_study and "base" in arms:
        reuse_study_runs(study, work, args.seeds)
    runs = [(arm, mix, seed) for arm in arms for seed in args.seeds for mix in MIXES]
    if args.no_train:  # the finished runs only
        results = {r: (str(p), _recorded_cpu(p.parent)) for r in runs
                   if (p := work / r[0] / f"{r[1].replace(':', '-')}-s{r[2]}" / "scores.csv").exists()}
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = {run: pool.submit(timed_scores, manifest, real if run[1] == "1:0" else synth, test,
                                        str(work / run[0] / f"{run[1].replace(':', '-')}-s{run[2]}"),
                                        json.loads(arms[run[0]]), run[2]) for run in runs}
            results = {run: f.result() for run, f in futures.items()}
    scores = pd.concat(pd.read_csv(path).assign(arm=a, mix=m, seed=s) for (a, m, s), (path, _) in results.items())
    cpu = pd.Series({run: c for run, (_, c) in results.items()}).groupby(level=0).mean()
    pd.set_option("display.width", 200)
    for arm in arms:
        per_case = as_per_case(scores[scores["arm"] == arm])
        per_seed = per_case.groupby(["mix", "seed", "region"])["dice"].mean().unstack("region")[list(REGIONS)]
        print(f"\n== {arm} {arms[arm]}: mean Dice per seed (12 test cases)")
        print(per_seed.round(3).to_string())
        if per_case.groupby("mix")["seed"].nunique().min() < 2:
            print(f"-- {arm}: fewer than 2 seeds in a mix: no variance components")
            continue
        table = noise_table(per_case, *args.design)
        print(f"-- {arm}: seed sd, variance components and minimum detectable Δ at {args.design[0]} test cases x "
              f"{args.design[1]} seeds per mix (80 % power, α 0.05); CPU s per training {cpu.get(arm, np.nan):.0f}")
        print(table.round(3).to_string())
        table.assign(arm=arm, cpu_seconds=cpu.get(arm, np.nan)).round(4).to_csv(work / f"noise_{arm}.csv")
        print(f"-- {arm}: paired minimum detectable Δ at other designs (test cases x seeds per mix)")
        print(design_table(per_case).round(3).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Segmenter recipes on a finished study's data: real-only (1:0) vs synthetic-only (0:1) Dice per recipe.

    .venv/bin/python -m bench.bench_segmenter_recipe --study runs/default-study --work W \\
        --arms 'light={}' 'nnunet={"augment": "nnunet"}' --seeds 0 1 2 3 [--jobs 2]

Each arm is NAME=JSON (overrides of the demo segmenter config). For every arm, mix and seed it trains the study's
default segmenter on the study's selected real training cases (1:0) or on the synthetic cases made from their masks
(0:1), predicts the study's real test cases and scores them with eval.segmentation; --jobs trainings run at once in
worker processes of one torch thread each. Prints mean Dice per arm, mix and region over seeds (seeds averaged per
case first), the per-seed spread, and the synthetic-only / real-only ratio per region. Resumable under --work.
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from bench.harness import finished_study_cases, segmenter_scores


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", required=True, help="a finished study folder (its data_manifest.csv and segmenters/)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--arms", nargs="+", default=["light={}"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    study, work = Path(args.study).resolve(), Path(args.work)
    real, synth, test = finished_study_cases(study)
    manifest = str(study / "data_manifest.csv")
    arms = dict(a.split("=", 1) for a in args.arms)
    runs = [(arm, mix, seed) for arm in arms for mix in ("1:0", "0:1") for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = {run: pool.submit(segmenter_scores, manifest, real if run[1] == "1:0" else synth, test,
                                    str(work / run[0] / f"{run[1].replace(':', '-')}-s{run[2]}"),
                                    json.loads(arms[run[0]]), run[2]) for run in runs}
        scores = pd.concat(pd.read_csv(f.result()).assign(arm=a, mix=m, seed=s) for (a, m, s), f in futures.items())
    per_seed = scores.groupby(["arm", "mix", "seed", "region"])["dice"].mean().unstack("region")
    print(per_seed.round(3).to_string())
    mean = scores.groupby(["arm", "mix", "region"])["dice"].mean().unstack("region")[["WT", "TC", "ET"]]
    spread = per_seed.groupby(["arm", "mix"]).std()[["WT", "TC", "ET"]].add_suffix(" sd(seeds)")
    table = mean.join(spread)
    print(table.round(3).to_string())
    for arm in arms:
        ratio = mean.loc[(arm, "0:1")] / mean.loc[(arm, "1:0")]
        print(f"{arm}: synthetic-only / real-only  WT {ratio['WT']:.2f}x  TC {ratio['TC']:.2f}x  ET {ratio['ET']:.2f}x")
    table.round(4).to_csv(work / "recipe_table.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())

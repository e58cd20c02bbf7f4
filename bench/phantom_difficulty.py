"""Is the phantom segmentation task non-trivial? Train the same segmenter on 4 vs 24 real phantom cases.

Both runs use segment.api.train (MONAI back end, demo network, the same number of optimiser steps for
both: --epochs x --iters steps of batch 2, no early stopping, best validation checkpoint) and are scored with
eval.segmentation on the same test split. The 4 cases are a subset of the 24. If 4 cases were enough to
reach the 24-case Dice, the cohort would be too easy to show any effect of data augmentation.

    .venv/bin/python -m bench.phantom_difficulty --work /tmp/phantom_bench [--seeds 0 1] [--cases 48]

Training is resumable: runs for different --sizes can go in parallel processes on the same --work folder;
a final run with all sizes then only predicts and reports.

Prints a table of mean test Dice per region and the 24/4 ratios measured in one run, and writes
WORK/results.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="working folder (cohort, models, predictions, results.json)")
    ap.add_argument("--cases", type=int, default=48, help="phantom cases to build (default 48)")
    ap.add_argument("--phantom-seed", type=int, default=0)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 24], help="training-set sizes (nested subsets)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    ap.add_argument("--threads", type=int, default=2, help="torch threads during training/prediction")
    ap.add_argument("--epochs", type=int, default=90,
                    help="epochs of --iters optimiser steps (default 90 = 900 steps of batch 2; with the segmenter's "
                         "short demo budget neither run learns the tumour core, see docs/phantom.md)")
    ap.add_argument("--iters", type=int, default=10, help="optimiser steps per epoch (default 10)")
    ap.add_argument("--patience", type=int, default=1000, help="early-stopping patience in epochs (default: off)")
    ap.add_argument("--val-every", type=int, default=10, help="validate (and keep the best checkpoint) every N epochs")
    ap.add_argument("--network", default="segresnet", choices=("segresnet", "dynunet"), help="MONAI network")
    ap.add_argument("--lr", type=float, default=3e-3)
    args = ap.parse_args(argv)

    from cohort.manifest import load_manifest, select
    from cohort.phantom import build_phantom_cohort
    from eval.segmentation import evaluate_predictions
    from segment.api import predict, train
    from segment.config import SegmenterConfig

    work = Path(args.work)
    t0 = time.perf_counter()
    manifest = build_phantom_cohort(work / "cohort", n_cases=args.cases, seed=args.phantom_seed, profile=args.profile)
    t_build = time.perf_counter() - t0
    df = load_manifest(manifest)
    train_pool = select(df, source="real", split="train")["case_id"].tolist()
    test_ids = select(df, source="real", split="test")["case_id"].tolist()
    if max(args.sizes) > len(train_pool):
        raise SystemExit(f"only {len(train_pool)} training cases; need {max(args.sizes)}")
    order = np.random.default_rng(1234).permutation(len(train_pool))
    pool = [train_pool[i] for i in order]  # smaller sets are subsets of larger ones
    rows, times = [], {}
    for seed in args.seeds:
        for n in args.sizes:
            run = f"{args.network}_n{n}_seed{seed}"
            cfg = SegmenterConfig(backend="monai", profile="demo" if args.profile != "tiny" else "tiny", seed=seed,
                                  num_threads=args.threads, epochs=args.epochs, patience=args.patience,
                                  val_every=args.val_every, iters_per_epoch=args.iters, batch_size=2, lr=args.lr,
                                  network=args.network)
            t = time.perf_counter()
            model = train(manifest, pool[:n], work / "models" / run, cfg)
            preds = predict(model, manifest, test_ids, work / "predictions" / run)
            times[run] = time.perf_counter() - t
            scores = evaluate_predictions(preds, manifest, progress=False)
            scores["n_train"], scores["seed"] = n, seed
            rows.append(scores)
    import pandas as pd

    per_case = pd.concat(rows, ignore_index=True)
    per_case.to_csv(work / "per_case.csv", index=False)
    table = per_case.groupby(["n_train", "region"])["dice"].agg(["mean", "std", "count"]).unstack("region")
    by_seed = per_case.groupby(["n_train", "seed", "region"])["dice"].mean().unstack("region")
    print(f"\nphantom {args.profile}: {args.cases} cases, {len(pool)} train pool, {len(test_ids)} test; "
          f"training seeds {args.seeds}; build {t_build:.0f} s")
    print(table.round(3).to_string())
    print("mean test Dice per training seed:")
    print(by_seed.round(3).to_string())
    means = per_case.groupby(["n_train", "region"])["dice"].mean().unstack("region")
    lo, hi = min(args.sizes), max(args.sizes)
    ratios = (means.loc[hi] / means.loc[lo]).round(3).to_dict()
    print(f"Dice ratio {hi}/{lo} cases: {ratios}")
    from eval.stats import bootstrap_ci

    paired = {}  # per (test case, seed): Dice with the larger set minus Dice with the smaller one
    for region, g in per_case.groupby("region"):
        wide = g.pivot_table(index=["case_id", "seed"], columns="n_train", values="dice")
        d = (wide[hi] - wide[lo]).to_numpy()
        low, high = bootstrap_ci(d)
        paired[region] = {"mean": round(float(d.mean()), 4), "ci95": [round(float(low), 4), round(float(high), 4)],
                          "larger_set_better": int((d > 0).sum()), "pairs": int(len(d))}
        print(f"paired {hi} - {lo} cases, {region}: {d.mean():+.3f} (95% bootstrap CI {low:+.3f} to {high:+.3f}); "
              f"better in {(d > 0).sum()} of {len(d)} (test case, seed) pairs")
    result = {"command": "python -m bench.phantom_difficulty " + " ".join(argv or sys.argv[1:]),
              "cases": args.cases, "profile": args.profile, "test_ids": test_ids, "train_pool": pool,
              "seeds": args.seeds, "network": args.network, "lr": args.lr,
              "mean_dice_per_seed": {f"n{k[0]}_seed{k[1]}": v for k, v in by_seed.round(4).to_dict("index").items()},
              "mean_dice": {int(k): v for k, v in means.round(4).to_dict("index").items()},
              "ratio_large_over_small": ratios, "paired_difference_large_minus_small": paired,
              "seconds_per_run": {k: round(v, 1) for k, v in times.items()},
              "build_seconds": round(t_build, 1)}
    (work / "results.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Sampler x steps: seconds, quality gate, and the Dice of a segmenter trained on each sampler's samples alone.

    .venv/bin/python bench/bench_sampler_table.py --generator G --cohort C/data_manifest.csv --work W \\
        [--runs ddpm:250 ddim:25:1 dpmpp2m:10:0:logsnr ...] [--seeds 0 1] [--n-real 8]

For each run (name:steps[:eta[:spacing]]) it synthesises one case per selected real training case (the study's
selection: cohort.selection, n_real cases, seed 0) with synth.synthesize_cohort (no redraws, so the gate column is
the first-draw pass rate), trains the study's default segmenter on those synthetic cases alone (as the study's
0:1 mix does) for each seed, and scores it on the cohort's real test split with eval.segmentation. Prints one row
per run with its wall seconds per volume and the ratio to the first run, the gate pass rate and mean Dice per
region. Everything is resumable under --work (synthesis and training both resume).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_RUNS = ["ddpm:250", "ddim:25:1", "ddim:10:1", "dpmpp2m:10:0:logsnr", "dpmpp2m-sde:10:1:logsnr",
                "dpmpp2m:10:0:quadratic"]


def parse_run(spec: str) -> tuple[str, int, float, str]:
    name, steps, eta, spacing = (spec.split(":") + [None, None])[:4]
    return name, int(steps), float(eta or 0), spacing or "leading"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--cohort", required=True, help="the real cohort's data_manifest.csv (the study's)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--n-real", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--segmenter", default="{}", help="JSON overrides of the segmenter config")
    args = ap.parse_args(argv)

    import json

    import torch

    from cohort.manifest import load_manifest, merge_manifests, select
    from cohort.selection import write_training_selection
    from cohort.staging import stage_cohort
    from eval.segmentation import evaluate_predictions
    from segment.api import predict, train
    from segment.config import SegmenterConfig
    from synth.synthesize import synthesize_cohort

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cohort = stage_cohort(args.cohort, work / "cohort")  # under work/: a merged manifest may not leave its root
    selected = write_training_selection(cohort, args.n_real, 0)
    test_ids = select(load_manifest(cohort), source="real", split="test")["case_id"].tolist()
    rows = []
    base = None
    for spec in args.runs:
        name, steps, eta, spacing = parse_run(spec)
        tag = spec.replace(":", "_")
        t0 = time.perf_counter()
        pool = synthesize_cohort(args.generator, selected, work / tag / "synthetic", args.n_real, name, steps, 0,
                                 eta=eta, spacing=spacing, max_retries=0, num_threads=args.threads, progress=False,
                                 cohort_name=f"bench-{tag}", device="cpu")
        per_volume = (time.perf_counter() - t0) / args.n_real
        synth = load_manifest(pool)
        passed = float((synth["quality_gate"] == "pass").mean())
        merged = work / f"merged-{tag}.csv"
        merge_manifests([cohort, pool], merged)
        scores = []
        for seed in args.seeds:
            cfg = SegmenterConfig(profile="demo", seed=seed, device="cpu", **json.loads(args.segmenter))
            model = train(merged, synth["case_id"].tolist(), work / tag / f"seg_s{seed}", cfg)
            preds = predict(model, merged, test_ids, work / tag / f"pred_s{seed}")
            scores.append(evaluate_predictions(preds, merged))
        dice = pd.concat(scores).groupby("region")["dice"].mean()
        base = base or per_volume
        rows.append({"run": spec, "s/volume": round(per_volume, 2), "x first": round(base / per_volume, 1),
                     "gate pass": round(passed, 2), **{r: round(float(dice[r]), 3) for r in ("WT", "TC", "ET")}})
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    pd.DataFrame(rows).to_csv(work / "sampler_table.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

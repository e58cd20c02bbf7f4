"""Sampler x steps: seconds, quality gate, and the Dice of a segmenter trained on each sampler's samples alone.

    .venv/bin/python -m bench.bench_sampler_table --generator G --cohort C/data_manifest.csv --work W \\
        [--runs ddpm:250 ddim:25:1 dpmpp2m:10:0:logsnr ...] [--seeds 0 1] [--n-real 8]

For each run (name:steps[:eta[:spacing[:analytic]]]; analytic = Analytic-DPM's variance) it synthesises one case per
selected real training case (the study's selection: cohort.selection, n_real cases, seed 0) with
synth.synthesize_cohort (no redraws, so the gate column is the first-draw pass rate), trains the study's default
segmenter on those synthetic cases alone (as the study's 0:1 mix does) for each seed, and scores it on the cohort's
real test split with eval.segmentation. Prints one row per run with its wall seconds per volume and the ratio to the
first run, the gate pass rate, the mean MS-SSIM across masks (eval.synthesis, as the study's report; the real cases'
value is printed once) and mean Dice per region with its spread over seeds (--seeds with no value skips the
segmenters). With seeds, a second table gives each run's paired Dice difference from the first run per region, with
the study's calibrated interval over test cases and seeds (seeds paired across runs), and whether it is
non-inferior (CI above -margin) or equivalent (CI within +-margin): eval.stats.paired_vs_first. Synthesis runs
first, alone; then --jobs trainings at once, one torch thread each. Everything is resumable under --work.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from bench.harness import real_test_ids, segmenter_scores, study_selection

DEFAULT_RUNS = ["ddpm:250", "ddim:25:1", "ddim:10:1", "dpmpp2m:10:0:logsnr", "dpmpp2m-sde:10:1:logsnr",
                "dpmpp2m:10:0:quadratic"]


def parse_run(spec: str) -> tuple[str, int, float, str, bool]:
    name, steps, eta, spacing, variance = (spec.split(":") + [None, None, None])[:5]
    if variance not in (None, "", "analytic"):
        raise SystemExit(f"{spec}: the fifth field is 'analytic' or empty, not {variance!r}")
    return name, int(steps), float(eta or 0), spacing or "leading", variance == "analytic"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--cohort", required=True, help="the real cohort's data_manifest.csv (the study's)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--n-real", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--segmenter", default="{}", help="JSON overrides of the segmenter config")
    ap.add_argument("--jobs", type=int, default=2, help="segmenter trainings at once (processes, 1 thread each)")
    ap.add_argument("--margin", type=float, default=0.02,
                    help="Dice margin of the paired comparison with the first run (the target 'within 0.02')")
    args = ap.parse_args(argv)

    import json

    import torch

    from cohort.manifest import load_manifest, merge_manifests
    from cohort.staging import stage_cohort
    from eval.stats import paired_vs_first
    from eval.synthesis import synthesis_table
    from synth.synthesize import SynthesisConfig, synthesize_cohort

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cohort = stage_cohort(args.cohort, work / "cohort")  # under work/: a merged manifest may not leave its root
    selected = study_selection(cohort, args.n_real)
    test_ids = real_test_ids(cohort)
    rows, merged_of, synth_ids = [], {}, {}
    for spec in args.runs:  # synthesis first, alone on the machine, so that its seconds are clean
        name, steps, eta, spacing, analytic = parse_run(spec)
        tag = spec.replace(":", "_")
        t0 = time.perf_counter()
        pool = synthesize_cohort(args.generator, selected, work / tag / "synthetic", SynthesisConfig(
            count=args.n_real, sampler=name, steps=steps, seed=0, eta=eta, spacing=spacing, analytic=analytic,
            max_retries=0, num_threads=args.threads, progress=False, cohort_name=f"bench-{tag}", device="cpu"))
        per_volume = (time.perf_counter() - t0) / args.n_real  # ~0 when resumed: time a fresh --work
        synth = load_manifest(pool)
        merged_of[spec], synth_ids[spec] = work / f"merged-{tag}.csv", synth["case_id"].tolist()
        merge_manifests([cohort, pool], merged_of[spec])
        quality = synthesis_table(cohort, pool, synthetic_id=tag, real_case_ids=synth["parent_case_id"].unique())
        ms_ssim = quality.set_index("metric")["value"]
        if not rows:
            print(f"MS-SSIM between the real cases: {ms_ssim['ms_ssim_real']:.3f}", flush=True)
        rows.append({"run": spec, "s/volume": round(per_volume, 2),
                     "x first": round(rows[0]["s/volume"] / per_volume, 1) if rows else 1.0,
                     "gate pass": round(float((synth["quality_gate"] == "pass").mean()), 2),
                     "MS-SSIM across masks": round(ms_ssim["ms_ssim_across_masks"], 3)})
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    # then the segmenters, --jobs at once (one torch thread each): the study's 0:1 mix on each run's samples
    with ProcessPoolExecutor(args.jobs) as workers:
        futures = {(spec, seed): workers.submit(segmenter_scores, str(merged_of[spec]), synth_ids[spec], test_ids,
                                                str(work / spec.replace(":", "_") / f"seg_s{seed}"),
                                                json.loads(args.segmenter), seed)
                   for spec in args.runs for seed in args.seeds}
        scores = {key: pd.read_csv(f.result()) for key, f in futures.items()}
    for row in rows:
        runs = [scores[(row["run"], seed)] for seed in args.seeds]
        if runs:
            per_seed = [r.groupby("region")["dice"].mean() for r in runs]
            dice = pd.concat(runs).groupby("region")["dice"].mean()
            for r in ("WT", "TC", "ET"):
                row[r] = round(float(dice[r]), 3)
                row[f"{r} sd(seeds)"] = round(float(pd.Series([d[r] for d in per_seed]).std()), 3)
    print(pd.DataFrame(rows).to_string(index=False), flush=True)
    if args.seeds and len(rows) > 1:
        deltas = paired_vs_first([row["run"] for row in rows], scores, args.seeds, args.margin)
        print(deltas.to_string(index=False), flush=True)
        deltas.to_csv(work / "sampler_deltas.csv", index=False)
    pd.DataFrame(rows).to_csv(work / "sampler_table.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

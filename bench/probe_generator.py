"""A quick look at a generator: 8 samples on the masks of the study's 8 selected cases, first-draw gate results and a
montage.

    .venv/bin/python bench/probe_generator.py --generator G --work W [--sampler ddim --steps 25 --eta 1 --spacing leading]
        [--masks selected|test]

Builds (or reuses) the default study's phantom cohort (48 cases, seed 0) under W/cohort, selects its 8 training
cases as the study does (cohort.selection, seed 0), synthesises one case per mask with no redraws
(synth.synthesize_cohort, max_retries=0), prints the gate pass rate and each failed check (also in
W/<tag>/quality_report.csv), the mean MS-SSIM across masks of the 8 samples next to that of the 8 real images (the
study's eval.synthesis.diversity with the same settings), the memorisation summary of the study's report
(eval.memorisation: each sample's similarity to its mask's owner, to the mask alone, and the share beyond it), and
writes W/montage_<tag>.png. The gate uses the intensity ranges beside G. --masks test takes the masks (and owners)
of the cohort's first 8 test cases instead, which no study generator is fine-tuned on: the gap between the two
owner similarities of a fine-tuned generator is what fine-tuning on the selected cases added. docs/benchmarks.md
("Demo generator") used it on the pre-training checkpoints.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True, help="generator.safetensors (intensity_ranges.json beside it)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--tag", default=None, help="name of this probe's output folder (default: from the sampler)")
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--spacing", default="leading")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--masks", choices=("selected", "test"), default="selected",
                    help="the study's 8 selected training cases (default) or the cohort's first 8 test cases")
    args = ap.parse_args(argv)

    import pandas as pd

    from cohort.manifest import load_manifest, select, write_manifest
    from cohort.phantom import build_phantom_cohort
    from cohort.selection import write_training_selection
    from eval.memorisation import memorisation_table, summarise
    from eval.plots import plot_montage
    from eval.synthesis import diversity, ms_ssim_settings, read_cases
    from synth.synthesize import synthesize_cohort

    work = Path(args.work)
    tag = args.tag or f"{args.sampler}_{args.steps}_{args.eta:g}_{args.spacing}"
    cohort = build_phantom_cohort(work / "cohort", n_cases=48, seed=0, profile="demo")
    selected = write_training_selection(cohort, 8, 0)
    owners = selected
    if args.masks == "test":
        owners = cohort.parent / "test_first8.csv"  # beside the cohort's manifest: its relative paths stay valid
        write_manifest(select(load_manifest(cohort), source="real", split="test").sort_values("case_id").head(8),
                       owners)
        tag = tag if args.tag else f"{tag}_test"
    out = work / tag
    shutil.rmtree(out, ignore_errors=True)  # a probe is always a fresh draw
    t0 = time.perf_counter()
    manifest = synthesize_cohort(args.generator, owners, out, 8, args.sampler, args.steps, 0, eta=args.eta,
                                 spacing=args.spacing, max_retries=0, num_threads=args.threads, progress=False,
                                 device="cpu", splits=None)
    seconds = (time.perf_counter() - t0) / 8
    passed = (load_manifest(manifest)["quality_gate"] == "pass").mean()
    print(f"{tag}: {seconds:.1f} s/volume, gate pass {passed:.2f}")
    report = pd.read_csv(out / "quality_report.csv")
    for row in report.itertuples():
        print(f"  {row.case_id}: {'pass' if row.passed else row.failures}")
    images = {name: [c.image for c in read_cases(m, source=src, progress=False)[1]]
              for name, m, src in (("synthetic", manifest, "synthetic"), ("real", owners, "real"))}
    settings = ms_ssim_settings(images["synthetic"][0].shape)
    across = {name: diversity([v.data for v in vols], None, settings=settings)["across"].mean()
              for name, vols in images.items()}
    print(f"MS-SSIM across masks: synthetic {across['synthetic']:.4f}, real {across['real']:.4f}")
    mem = summarise(memorisation_table(cohort, manifest, synthetic_id=tag, train_ids=load_manifest(selected)["case_id"],
                                       progress=False)).iloc[0]
    print(f"memorisation (the study's table): owner similarity median {mem.owner_similarity_median:.3f}, mask alone "
          f"{mem.mask_similarity_median:.3f}, beyond the mask {mem.frac_beyond_mask:.2f}")
    plot_montage(cohort, manifest, work / f"montage_{tag}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampler x steps: seconds per written and gated volume, quality gate, fidelity, and the Dice of a segmenter trained on
each sampler's samples alone; a distilled student (synth.distill) beside the samplers of its teacher (issue 33).

    .venv/bin/python -m bench.bench_sampler_table --generator G --cohort C/data_manifest.csv --work W \\
        [--runs ddpm:250 ddim:10:1 distilled ...] [--student S [S ...]] [--repeats 3] [--seeds 0 1] [--n-real 8] \\
        [--montage W/sampler_montage.png]

Runs: name:steps[:eta[:spacing[:analytic]]] (analytic = Analytic-DPM's variance) sample --generator; the run
``distilled`` (no other field) samples each student of --student (generators made by `medddpm distill`, at most one
per step count) with synth's sampler "distilled" at the steps its card records, labelled "distilled-N" (the bench
says whether each card names --generator as its teacher and whether both are gated with the same
intensity_ranges.json). Each run synthesises
one case per selected real training case (the study's selection: cohort.selection, n_real cases, seed 0) with
synth.synthesize_cohort (no redraws, so the gate column is the first-draw pass rate): that pool is resumable under
--work and is what the segmenters train on. Then each run's synthesis is timed --repeats times into throwaway
folders (same masks and settings, deleted after each timing), the repeats interleaved across runs (repeat 1 of
every run, then repeat 2, ...) so that a change of load hits every run alike: the seconds are of the whole
synthesize_cohort call (load the generator, sample, gate, write) divided by the volumes it wrote, fresh even when
the pools were resumed. Printed per run: s/volume min and median over the repeats (median: the upper middle of an
even count) and the first run's over this run's (min/min, median/median), the gate pass rate, the same median
ratio per volume that passes the gate (each run's seconds divided by its first-draw pass rate: a study redraws the
failures, so a run passing half its draws pays two per kept volume), the mean MS-SSIM across masks
(eval.synthesis, as the study's report; the real cases' value is printed once).

Fidelity (eval.synthesis.fidelity_table): each run's pool against the cohort's real test cases, beside the real
images of the same masks, with bootstrap intervals: fidelity_frd, fidelity_frd_excess (0: as close to the test
cases as the masks' own real images are) and paired MS-SSIM (each sample with the real image of its mask); printed
with the gate pass (k/n) and written to W/sampler_fidelity.csv. Its masks count as held out only for a generator
that never saw them (the shipped pre-trained generator, trained on another phantom cohort); with the study's own
generator they are its training masks. --montage: one figure, the real image and each run's sample on the first
two selected masks (eval.plots.plot_sampler_montage).

Segmenters: the study's default segmenter trained on each run's samples alone (as the study's 0:1 mix does) for
each seed and scored on the cohort's real test split with eval.segmentation: mean Dice per region with its spread
over seeds (--seeds with no value skips them). With seeds, a second table gives each run's paired Dice difference
from the first run per region, with the study's calibrated interval over test cases and seeds (seeds paired across
runs), and whether it is non-inferior (CI above -margin) or equivalent (CI within +-margin):
eval.stats.paired_vs_first. All synthesis (pools and timings) runs first, alone; then --jobs trainings at once, one
torch thread each. Pools and segmenters are resumable under --work; the timings are always taken anew.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.harness import Timing, real_test_ids, segmenter_scores, study_selection
from synth.schedulers import DISTILLED

DEFAULT_RUNS = ["ddpm:250", "ddim:25:1", "ddim:10:1", "dpmpp2m:10:0:logsnr", "dpmpp2m-sde:10:1:logsnr",
                "dpmpp2m:10:0:quadratic"]
FIDELITY = ("fidelity_frd", "fidelity_frd_real", "fidelity_frd_excess", "paired_ms_ssim")


def parse_run(spec: str) -> tuple[str, int, float, str, bool]:
    name, steps, eta, spacing, variance = (spec.split(":") + [None, None, None])[:5]
    if variance not in (None, "", "analytic"):
        raise SystemExit(f"{spec}: the fifth field is 'analytic' or empty, not {variance!r}")
    if steps is None:
        raise SystemExit(f"{spec}: a run is name:steps[:eta[:spacing[:analytic]]] (or {DISTILLED!r} with --student)")
    return name, int(steps), float(eta or 0), spacing or "leading", variance == "analytic"


@dataclass(frozen=True)
class Run:
    """One row of the table: which generator samples how."""

    label: str       # the row's name: the spec, or distilled-N
    generator: str
    sampler: str
    steps: int
    eta: float = 0.0
    spacing: str = "leading"
    analytic: bool = False

    @property
    def tag(self) -> str:
        """The run's folder name under --work."""
        return self.label.replace(":", "_")

    def config(self, n: int, threads: int):
        from synth.synthesize import SynthesisConfig

        return SynthesisConfig(count=n, sampler=self.sampler, steps=self.steps, seed=0, eta=self.eta,
                               spacing=self.spacing, analytic=self.analytic, max_retries=0, num_threads=threads,
                               progress=False, cohort_name=f"bench-{self.tag}", device="cpu")


def resolve_runs(spec: str, generator: str, students: list[str] | None) -> list[Run]:
    """A run spec as its Runs: one, or for 'distilled' one per student at its card's steps (before any work)."""
    if spec.split(":")[0] == DISTILLED:
        if spec != DISTILLED:
            raise SystemExit(f"{spec}: the run {DISTILLED!r} takes no fields (the student's card gives its steps)")
        if not students:
            raise SystemExit(f"run {DISTILLED!r} needs --student PATH (a generator made by `medddpm distill`)")
        runs = []
        for student in students:
            steps = int(student_card_of(student)["student_steps"])
            runs.append(Run(f"{DISTILLED}-{steps}", student, DISTILLED, steps))
        return runs
    name, steps, eta, spacing, analytic = parse_run(spec)
    return [Run(spec, generator, name, steps, eta, spacing, analytic)]


def student_card_of(student: str) -> dict:
    """The distillation card of --student (synth.distill.read_student_card: its metadata, not its weights); synth's
    one-line error naming the file as the exit message when it is no student, unreadable or missing."""
    from core.errors import MedDDPMError
    from synth.distill import read_student_card

    try:
        return read_student_card(student)
    except MedDDPMError as e:
        raise SystemExit(str(e)) from None


def teacher_note(student: str, generator: str) -> str:
    """Whether --student was distilled from --generator (its card's teacher_sha256) and is gated with the same
    intensity ranges (the file beside each): the table compares them."""
    from core.fsutil import sha256_file
    from synth.checkpoint import RANGES_FILE, resolve_generator

    card, gen = student_card_of(student), resolve_generator(generator)
    if not gen.is_file():
        raise SystemExit(f"{gen}: --generator does not exist")
    sha = sha256_file(gen)
    source = ("--generator" if card.get("teacher_sha256") == sha else
              f"teacher {str(card.get('teacher_sha256'))[:12]}, NOT --generator ({sha[:12]})")
    ranges = [p.parent / RANGES_FILE for p in (resolve_generator(student), gen)]
    same = all(p.exists() for p in ranges) and ranges[0].read_bytes() == ranges[1].read_bytes()
    return (f"student {student}: {card['student_steps']}-step, distilled from {source}; gate ranges "
            + ("the same as --generator's" if same else f"NOT the same file contents as --generator's ({ranges[1]})"))


def timed_synthesis(run: Run, masks: Path, scratch: Path, n: int, threads: int) -> float:
    """Seconds of one synthesize_cohort call into an empty ``scratch`` folder (deleted afterwards): load, sample,
    gate and write n volumes, never a resumed pool's few leftover cases."""
    from synth.synthesize import synthesize_cohort

    shutil.rmtree(scratch, ignore_errors=True)  # a killed bench's leftover would be resumed, not timed
    t0 = time.perf_counter()
    synthesize_cohort(run.generator, masks, scratch, run.config(n, threads))
    seconds = time.perf_counter() - t0
    shutil.rmtree(scratch)
    return seconds


def fidelity_row(label: str, table: pd.DataFrame, gate: pd.Series) -> dict:
    """One run's line of sampler_fidelity.csv from fidelity_table's rows: each metric with its interval."""
    passed = int((gate == "pass").sum())
    row = {"run": label, "gate pass": f"{passed}/{len(gate)}", "gate_passed": passed, "n": len(gate)}
    by_metric = table.set_index("metric")
    for metric in FIDELITY:
        if metric in by_metric.index:
            m = by_metric.loc[metric]
            row.update({metric: float(m["value"]), f"{metric}_lo": float(m["ci_low"]),
                        f"{metric}_hi": float(m["ci_high"])})
    return row


def _with_interval(row: dict, metric: str, digits: int) -> str:
    if metric not in row:
        return ""
    return f"{row[metric]:.{digits}f} [{row[f'{metric}_lo']:.{digits}f}, {row[f'{metric}_hi']:.{digits}f}]"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--student", nargs="+", help="distilled students (`medddpm distill`), each sampled by the run "
                                                 "'distilled' (one per step count)")
    ap.add_argument("--cohort", required=True, help="the real cohort's data_manifest.csv (the study's)")
    ap.add_argument("--work", required=True)
    ap.add_argument("--runs", nargs="+", default=DEFAULT_RUNS)
    ap.add_argument("--repeats", type=int, default=1,
                    help="timed syntheses per run into throwaway folders (min and median), interleaved across runs")
    ap.add_argument("--seeds", type=int, nargs="*", default=[0])
    ap.add_argument("--n-real", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--segmenter", default="{}", help="JSON overrides of the segmenter config")
    ap.add_argument("--jobs", type=int, default=2, help="segmenter trainings at once (processes, 1 thread each)")
    ap.add_argument("--margin", type=float, default=0.02,
                    help="Dice margin of the paired comparison with the first run (the target 'within 0.02')")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples of the fidelity intervals")
    ap.add_argument("--montage", help="PNG: the real image and each run's sample on the first two selected masks")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit(f"--repeats {args.repeats}: at least 1 timed synthesis per run")
    runs = [run for spec in args.runs for run in resolve_runs(spec, args.generator, args.student)]  # before work
    labels = [run.label for run in runs]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"--runs: each run once, not {labels}")

    if any(run.sampler == DISTILLED for run in runs):
        for student in args.student:
            print(teacher_note(student, args.generator), flush=True)

    import json

    import torch

    from cohort.manifest import load_manifest, merge_manifests
    from cohort.staging import stage_cohort
    from core.fsutil import atomic_path
    from eval.stats import paired_vs_first
    from eval.synthesis import fidelity_table, synthesis_table
    from synth.synthesize import synthesize_cohort

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cohort = stage_cohort(args.cohort, work / "cohort")  # under work/: a merged manifest may not leave its root
    selected = study_selection(cohort, args.n_real)
    test_ids = real_test_ids(cohort)
    rows, pools, merged_of, synth_ids, pass_rate = [], {}, {}, {}, {}
    for run in runs:  # the pools (resumable): what the segmenters train on and fidelity is measured on
        pools[run.label] = pool = synthesize_cohort(run.generator, selected, work / run.tag / "synthetic",
                                                    run.config(args.n_real, args.threads))
        synth = load_manifest(pool)
        merged_of[run.label], synth_ids[run.label] = work / f"merged-{run.tag}.csv", synth["case_id"].tolist()
        merge_manifests([cohort, pool], merged_of[run.label])
        quality = synthesis_table(cohort, pool, synthetic_id=run.tag, real_case_ids=synth["parent_case_id"].unique())
        ms_ssim = quality.set_index("metric")["value"]
        if not rows:
            print(f"MS-SSIM between the real cases: {ms_ssim['ms_ssim_real']:.3f}", flush=True)
        pass_rate[run.label] = float((synth["quality_gate"] == "pass").mean())
        rows.append({"run": run.label, "gate pass": round(pass_rate[run.label], 2),
                     "MS-SSIM across masks": round(ms_ssim["ms_ssim_across_masks"], 3)})
        print(pd.DataFrame(rows).to_string(index=False), flush=True)
    # the timings: fresh written and gated volumes, repeat r of every run before repeat r + 1 of any
    seconds: dict[str, list[float]] = {run.label: [] for run in runs}
    for repeat in range(args.repeats):
        for run in runs:
            seconds[run.label].append(timed_synthesis(run, selected, work / "timing" / run.tag, args.n_real,
                                                      args.threads))
            print(f"timed {run.label} (repeat {repeat + 1}/{args.repeats}): {seconds[run.label][-1]:.2f} s for "
                  f"{args.n_real} volumes", flush=True)
    per_volume = {label: Timing(tuple(s / args.n_real for s in sec)) for label, sec in seconds.items()}
    first = per_volume[labels[0]]
    for row in rows:
        t = per_volume[row["run"]]
        row.update({"s/volume min": round(t.min, 3), "s/volume median": round(t.median, 3),
                    "x first (min)": round(first.min / t.min, 1),
                    "x first (median)": round(first.median / t.median, 1),
                    # what a study pays per volume that passes: it redraws the others (1 / pass rate draws each)
                    "x first per passing volume (median)": (
                        round(first.median / pass_rate[labels[0]] / (t.median / pass_rate[row["run"]]), 1)
                        if pass_rate[row["run"]] > 0 and pass_rate[labels[0]] > 0 else float("nan"))})
    rows = [{k: row[k] for k in ("run", "s/volume min", "s/volume median", "x first (min)", "x first (median)",
                                 "gate pass", "x first per passing volume (median)", "MS-SSIM across masks")}
            for row in rows]
    print(f"seconds per written and gated volume over {args.repeats} repeat(s), interleaved across runs:")
    print(pd.DataFrame(rows).to_string(index=False), flush=True)
    with atomic_path(work / "sampler_timings.csv") as tmp:
        pd.DataFrame([{"run": label, "repeat": k + 1, "seconds": s, "volumes": args.n_real}
                      for label, sec in seconds.items() for k, s in enumerate(sec)]).to_csv(tmp, index=False)
    # fidelity on the pools' masks against the real test cases (after the timings: they ran alone)
    fidelity = [fidelity_row(label, fidelity_table(cohort, pools[label], reference_ids=test_ids, synthetic_id=label,
                                                   n_boot=args.n_boot),
                             load_manifest(pools[label])["quality_gate"]) for label in labels]
    print(f"fidelity: each pool's {args.n_real} masks vs the {len(test_ids)} real test cases (eval.synthesis."
          "fidelity_table; 95 % bootstrap intervals):")
    print(pd.DataFrame([{"run": f["run"], "gate pass": f["gate pass"],
                         "fidelity_frd": _with_interval(f, "fidelity_frd", 1),
                         "fidelity_frd_excess": _with_interval(f, "fidelity_frd_excess", 1),
                         "paired MS-SSIM": _with_interval(f, "paired_ms_ssim", 3)}
                        for f in fidelity]).to_string(index=False), flush=True)
    with atomic_path(work / "sampler_fidelity.csv") as tmp:
        pd.DataFrame(fidelity).to_csv(tmp, index=False)
    if args.montage:
        from eval.plots import plot_sampler_montage

        owners = load_manifest(selected)["case_id"].astype(str).tolist()[:2]
        print(f"montage: {plot_sampler_montage(cohort, pools, owners, Path(args.montage))}", flush=True)
    # then the segmenters, --jobs at once (one torch thread each): the study's 0:1 mix on each run's samples
    with ProcessPoolExecutor(args.jobs) as workers:
        futures = {(label, seed): workers.submit(segmenter_scores, str(merged_of[label]), synth_ids[label], test_ids,
                                                 str(work / run.tag / f"seg_s{seed}"), json.loads(args.segmenter),
                                                 seed)
                   for run, label in zip(runs, labels) for seed in args.seeds}
        scores = {key: pd.read_csv(f.result()) for key, f in futures.items()}
    for row in rows:
        per_run = [scores[(row["run"], seed)] for seed in args.seeds]
        if per_run:
            per_seed = [r.groupby("region")["dice"].mean() for r in per_run]
            dice = pd.concat(per_run).groupby("region")["dice"].mean()
            for r in ("WT", "TC", "ET"):
                row[r] = round(float(dice[r]), 3)
                row[f"{r} sd(seeds)"] = round(float(pd.Series([d[r] for d in per_seed]).std()), 3)
    print(pd.DataFrame(rows).to_string(index=False), flush=True)
    if args.seeds and len(rows) > 1:
        deltas = paired_vs_first(labels, scores, args.seeds, args.margin)
        print(deltas.to_string(index=False), flush=True)
        with atomic_path(work / "sampler_deltas.csv") as tmp:
            deltas.to_csv(tmp, index=False)
    with atomic_path(work / "sampler_table.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CLI verbs of this package (registered by medddpm.cli): report, synthesis-quality."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="(re)build STUDY_DIR/report/ from the study's results",
        description="Rebuild the study report (results.csv, report.md, self-contained report.html, PNG plots) "
                    "from STUDY_DIR/results/per_case.csv, optional results/synthesis.csv and "
                    "results/memorisation.csv, study.json and the study's manifests. See docs/eval.md.")
    p.add_argument("study_dir", metavar="STUDY_DIR", help="the study folder (holds results/per_case.csv)")
    p.set_defaults(func=_report)

    q = subparsers.add_parser(
        "synthesis-quality", help="compute diversity, MMD and memorisation tables of a study's synthetic cohorts",
        description="For every STUDY_DIR/synthetic/<id>/ cohort: MS-SSIM diversity (within and across masks, and "
                    "on real images), MMD, and nearest-neighbour memorisation against the real training images "
                    "with a copy threshold calibrated on real test images. Writes results/synthesis.csv and "
                    "results/memorisation.csv (semantic consistency and the Fréchet distance need a trained "
                    "segmenter: use eval.results.evaluate_synthesis from Python).")
    q.add_argument("study_dir", metavar="STUDY_DIR", help="the study folder")
    q.add_argument("--max-pairs", type=int, default=100, help="MS-SSIM pairs per statistic (seeded sample)")
    q.add_argument("--rule", choices=("max", "p99"), default="max", help="copy-threshold rule (default max)")
    q.add_argument("--seed", type=int, default=0, help="seed of pair sampling")
    q.add_argument("--no-report", action="store_true", help="do not rebuild the report afterwards")
    q.set_defaults(func=_synthesis_quality)


def _report(args) -> int:
    from .report import build_report

    out = build_report(args.study_dir)
    print(f"report: {out / 'report.html'}")
    return 0


def _synthesis_quality(args) -> int:
    from .records import StudyRecord
    from .report import build_report
    from .results import evaluate_synthesis, real_manifest

    record = StudyRecord.read(args.study_dir)
    written = evaluate_synthesis(args.study_dir, real_manifest=real_manifest(args.study_dir),
                                 train_ids=record.generator_train_ids() if record else None,
                                 max_pairs=args.max_pairs, seed=args.seed, rule=args.rule)
    holdout = (record.model_extra or {}).get("holdout") if record else None
    if holdout:  # the study's samples on held-out masks: their fidelity against the other held-out real cases
        from pathlib import Path

        from .results import write_results
        from .synthesis import fidelity_table

        study = Path(args.study_dir)
        fid = fidelity_table(real_manifest(study), study / holdout["manifest"],
                             reference_ids=holdout["reference_case_ids"], seed=args.seed)
        written = {**written, **write_results(study, synthesis=fid)}
    for name, path in written.items():
        print(f"{name}: {path}")
    if not args.no_report:
        print(f"report: {build_report(args.study_dir) / 'report.html'}")
    return 0

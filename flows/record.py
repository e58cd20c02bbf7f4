"""What augment-study records besides its files: study.json (eval.records.StudyRecord, assembled here from what the
stages made) and two Prefect artifacts, the table ``dice-by-mix`` and the markdown ``augment-study-report``."""
from __future__ import annotations

import json
from pathlib import Path

from core.provenance import package_versions
from eval.records import CheckpointRecord, CohortRecord, PoolRecord, RunRecord, StudyRecord, TestSetRecord

from .plan import StudyPlan
from .refs import FileRef

TABLE_KEY = "dice-by-mix"
REPORT_KEY = "augment-study-report"


def study_record(study: Path, plan: StudyPlan, stages: dict[str, FileRef | None], *, cohort: FileRef,
                 checkpoint: FileRef | None, pools: dict[str, FileRef],
                 pool_orders: dict[str, tuple[list[str], set[str]]], jobs: list[dict], test_sets: list[dict],
                 trained: list[dict], holdout: FileRef | None = None, case_list: dict | None = None) -> StudyRecord:
    """study.json's content. ``stages``: each cached stage's output by stage name (None: the stage did not run);
    their hashes and wall times are recorded, except for the files the study was given (a cohort already inside the
    study folder, a Med-DDPM checkpoint to reuse), which no stage made. Stable across reruns: the times are those
    of the task runs that did the work. ``holdout``: the samples on held-out masks (plan.holdout), recorded with
    their masks' owners and the real reference cases under "holdout". ``case_list``: the curated subset's
    cohort.case_list.CaseList.record() (file, sha256, n_cases), recorded under "case_list"."""
    params = plan.params
    given = {str(Path(f).resolve()) for f in (params.cohort_manifest, params.medddpm_checkpoint) if f}
    made = {name: r for name, r in stages.items() if r is not None and r.path not in given}
    in_study = lambda r: str(Path(r.path).relative_to(study)) if study in Path(r.path).parents else r.path  # noqa: E731
    run_seconds = {t["run"]: t["model"].seconds + sum(e.seconds for e in t["evals"]) for t in trained}
    return StudyRecord(
        study=params.study_key, parameters=params.as_dict(),
        cohort=CohortRecord(manifest=in_study(cohort), sha256=cohort.sha256, n_real_train=len(plan.train_ids),
                            train_case_ids=plan.train_ids, selected_manifest=in_study(stages["select"]),
                            n_test=len(plan.test_ids)),
        hashes={name: r.sha256 for name, r in made.items()},
        checkpoint=CheckpointRecord(path=checkpoint.path, sha256=checkpoint.sha256) if pools else None,
        synthetic={name: PoolRecord(manifest=str(Path(p.path).relative_to(study)), sha256=p.sha256,
                                    n=len(pool_orders[name][0]), gate_failed=len(pool_orders[name][1]),
                                    gate_failures=params.gate_failures)
                   for name, p in pools.items()},
        runs=[RunRecord(**{k: v for k, v in j.items() if k != "case_ids"}, n_cases=len(j["case_ids"])) for j in jobs],
        test_sets=[TestSetRecord(name=t["name"], manifest=t["manifest"].path, n=len(t["case_ids"])) for t in test_sets],
        wall_seconds={**{name: r.seconds for name, r in made.items()},
                      "segmenters (train+predict+evaluate, sum over runs)": round(sum(run_seconds.values()), 3)},
        versions=package_versions(),
        **({"holdout": holdout_record(study, plan, holdout)} if holdout is not None else {}),
        **({"case_list": case_list} if case_list is not None else {}),
    )


def holdout_record(study: Path, plan: StudyPlan, holdout: FileRef) -> dict:
    """study.json's "holdout": the pool on held-out masks (fidelity and memorisation only, never a segmenter's)."""
    h = plan.holdout
    path = Path(holdout.path)
    return {"manifest": str(path.relative_to(study)) if study in path.parents else str(path), "sha256": holdout.sha256,
            "mask_case_ids": list(h.mask_ids), "reference_case_ids": list(h.reference_ids), "seed": h.seed,
            "used_by_segmenters": False}


def dice_by_mix(per_case_csv: str | Path):
    """Mean Dice with its 95 % interval (eval.stats.case_seed_interval) per (mix, back end, test set, region) in
    the paper's row order."""
    import pandas as pd

    from eval.stats import aggregate

    agg = aggregate(pd.read_csv(per_case_csv))
    cols = ["test_set", "kind", "mix", "n_real", "n_synth", "backend", "region", "n_cases", "n_seeds",
            "dice_mean", "dice_ci_low", "dice_ci_high", "hd95_mean"]
    return agg[[c for c in cols if c in agg.columns]].round(4)


def publish_artifacts(per_case_csv: str | Path, report_dir: str | Path) -> None:
    """Table artifact ``dice-by-mix`` and markdown artifact ``augment-study-report`` (stable keys, so the UI
    shows each study run as a new version of the same artifact)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    report_dir = Path(report_dir)
    table = dice_by_mix(per_case_csv)
    create_table_artifact(key=TABLE_KEY, table=json.loads(table.to_json(orient="records")),
                          description="Dice by training mix (mean over test cases and seeds, 95% interval over "
                                      "test cases and segmenter seeds)")
    md_file = report_dir / "report.md" if report_dir.is_dir() else report_dir
    text = md_file.read_text() if md_file.exists() else f"Report folder: {report_dir}"
    create_markdown_artifact(key=REPORT_KEY, markdown=text, description=f"augment-study report ({report_dir})")

"""Prefect flows of the augment study: train-medddpm, synthesize-cohort, train-segmenter, augment-study.

augment-study trains (or reuses) Med-DDPM on the study's real training cases, synthesises exactly the cases its
mixes need, trains one segmenter per (mix, back end, seed), evaluates all of them on the same real test split
(and on an optional external test manifest), writes STUDY/results/per_case.csv and study.json, builds the
report (eval.report) and publishes two artifacts: the table ``dice-by-mix`` and the markdown
``augment-study-report``. Layout of STUDY: docs/architecture.md; flow details: docs/flows.md.

Every step is a cached task (flows/tasks.py) whose results persist under STUDY/.prefect/results: rerunning a
finished study executes no task, and a crashed study resumes at the first task that had not finished.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import platform
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from cohort.errors import CohortError
from cohort.fsutil import atomic_write_text

# absolute imports: however Prefect loads this file (module path or file path), FileRef and the tasks are the
# classes of the flows package, so cached results of any run validate as parameters of any other run
from flows import registry, tasks
from flows.mixes import DEFAULT_MIXES, SynthesisPlan, parse_mixes
from flows.refs import FileRef, hash_json, ref
from eval.records import CheckpointRecord, CohortRecord, PoolRecord, RunRecord, StudyRecord, TestSetRecord

RESULTS_SUBDIR = Path(".prefect") / "results"
TABLE_KEY = "dice-by-mix"
REPORT_KEY = "augment-study-report"
SEGMENTER_PROFILE = {"tiny": "tiny", "demo": "demo"}  # any other cohort profile trains the "paper" budget


def storage_for(study_dir: Path) -> Path:
    """Task results and cache records live inside the study: deleting the folder forgets the cache too."""
    return (study_dir / RESULTS_SUBDIR).resolve()


def bound(task, study_dir: Path):
    return task.with_options(result_storage=storage_for(study_dir))


def fresh(task, study_dir: Path, *args, **kwargs) -> FileRef:
    """Run a cached task; if a cache hit points at files that were deleted or changed since, run it again."""
    t = bound(task, study_dir)
    out = t(*args, **kwargs)
    if not out.is_intact():
        get_run_logger().warning(f"{task.name}: cached result {out.path} is missing or changed; recomputing")
        out = t.with_options(refresh_cache=True)(*args, **kwargs)
    return out


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("medddpm-augment", "torch", "monai", "nnunetv2", "prefect", "prefect-dask", "numpy", "pandas",
                "nibabel", "SimpleITK", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def case_ids(manifest: FileRef, *, source: str | None = None, split: str | None = None) -> list[str]:
    from cohort.manifest import load_manifest, select

    return sorted(select(load_manifest(manifest.p), source=source, split=split)["case_id"].astype(str).tolist())


def pool_order(pool: FileRef, gate_failures: str) -> tuple[list[str], set[str]]:
    """(synthetic case ids in the order mixes take them, ids that failed synth's quality gate).

    exclude: gate failures left out; keep: synthesis order; fill: cases that passed first, failures only after
    them (used only by a mix that needs more cases than passed)."""
    from cohort.manifest import load_manifest, select

    df = select(load_manifest(pool.p), source="synthetic")
    failed = df["quality_gate"].fillna("pass") == "fail" if "quality_gate" in df.columns else df["case_id"].isna()
    ids, bad = df["case_id"].astype(str), set(df["case_id"][failed].astype(str))
    if gate_failures == "keep":
        return ids.tolist(), bad
    passing = ids[~failed.to_numpy()].tolist()
    return (passing if gate_failures == "exclude" else passing + ids[failed.to_numpy()].tolist()), bad


# ---------------------------------------------------------------------------------------------------------------
# single-step flows (also usable on their own, e.g. from the CLI or a deployment)

@flow(name="train-medddpm", log_prints=True)
def train_medddpm_flow(manifest: str, out: str, profile: str = "demo", config: dict | None = None) -> str:
    """Train (or resume) Med-DDPM on a manifest's real training rows; returns the checkpoint path."""
    out_dir = Path(out).resolve()
    return fresh(tasks.train_medddpm, out_dir, ref(manifest), profile, str(out_dir), config or {}).path


@flow(name="synthesize-cohort", log_prints=True)
def synthesize_cohort_flow(checkpoint: str, masks: str, out: str, count: int, sampler: str = "ddim",
                           steps: int = 50, seed: int = 0, cohort_id: str = "synthetic") -> str:
    """Paired image-mask cohort from a checkpoint and a manifest of conditioning masks; returns its manifest."""
    out_dir = Path(out).resolve()
    return fresh(tasks.synthesize, out_dir, ref(checkpoint), ref(masks), str(out_dir), count, sampler, steps, seed,
                 cohort_id).path


@flow(name="train-segmenter", log_prints=True)
def train_segmenter_flow(manifest: str, case_ids: list[str], out: str, config: dict | None = None) -> str:
    """Train (or resume) one segmenter on the given cases of a manifest; returns the model folder."""
    out_dir = Path(out).resolve()
    return fresh(tasks.train_segmenter, out_dir, ref(manifest), list(case_ids), str(out_dir), config or {}).path


# ---------------------------------------------------------------------------------------------------------------
# the per-run fan-out (thread pool by default, Dask with dask_address / dask_workers)

@flow(name="train-segmenters", log_prints=True)
def train_segmenters(study_dir: str, manifest: FileRef, jobs: list[dict], test_sets: list[dict],
                     refresh: bool = False) -> list[dict]:
    """Train, predict and evaluate one segmenter per job; the task runner decides where they run.

    Returns one {"run", "model": FileRef, "evals": [FileRef per test set]} per job."""
    study = Path(study_dir)
    train_t, predict_t, eval_t = (bound(t, study).with_options(refresh_cache=refresh)
                                  for t in (tasks.train_segmenter, tasks.predict, tasks.evaluate))
    pending = []
    for job in jobs:
        model = train_t.submit(manifest, job["case_ids"], job["model_dir"], job["config"])
        evals = []
        for ts in test_sets:
            pred_dir = study / "predictions" / (job["run"] if ts["name"] == "test" else f"{job['run']}--{ts['name']}")
            preds = predict_t.submit(model, ts["manifest"], ts["case_ids"], str(pred_dir))
            run = {**job["columns"], "test_set": ts["name"]}
            out_csv = study / "results" / "runs" / f"{job['run']}--{ts['name']}.csv"
            evals.append(eval_t.submit(preds, ts["manifest"], run, str(out_csv)))
        pending.append((job["run"], model, evals))
    return [{"run": run, "model": model.result(), "evals": [e.result() for e in evals]}
            for run, model, evals in pending]


def segmenter_task_runner(dask_address: str | None, dask_workers: int, parallel: int):
    if dask_address or dask_workers:
        from prefect_dask import DaskTaskRunner

        if dask_address:  # an existing cluster (e.g. dask-scheduler on a head node)
            return DaskTaskRunner(address=dask_address)
        # one thread per worker process: each training uses torch's own threads
        return DaskTaskRunner(cluster_kwargs={"n_workers": int(dask_workers), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=max(1, int(parallel)))


# ---------------------------------------------------------------------------------------------------------------

@flow(name="augment-study", log_prints=True)
def augment_study(
    out: str = "runs/default-study",
    cohort_manifest: str | None = None,
    profile: str = "demo",
    n_cases: int = 48,
    cohort_seed: int = 0,
    mixes: list[str] = list(DEFAULT_MIXES),
    n_real: int = 8,
    backends: list[str] = ["monai"],
    seeds: list[int] = [0, 1],
    external_test_manifest: str | None = None,
    medddpm_checkpoint: str | None = None,
    medddpm_config: dict | None = None,
    medddpm_on: str = "selected",
    sampler: str = "ddim",
    sampling_steps: int = 25,
    synth_seed: int = 0,
    gate_failures: str = "fill",
    segmenter_config: dict | None = None,
    parallel: int = 2,
    dask_address: str | None = None,
    dask_workers: int = 0,
) -> dict[str, Any]:
    """The augmentation study. Parameters (all JSON, so a deployment run can override any of them):

    out: study folder. cohort_manifest: the real cohort (None = build the embedded phantom cohort with n_cases and
    cohort_seed at ``profile``). mixes: "R:S[@real|@edited]" (flows/mixes.py). n_real: real training cases used
    by every mix (the data-scarce regime). backends: segmenter back ends ("monai", "nnunet"). seeds: one
    segmenter per (mix, back end, seed). external_test_manifest: another real cohort at the same profile,
    evaluated too (test_set = its cohort name). medddpm_checkpoint: reuse a trained model instead of training.
    medddpm_config / segmenter_config: overrides of the libraries' profile defaults. medddpm_on: "selected"
    (Med-DDPM sees only the n_real cases, the honest data-scarce setting) or "all" (every real training case).
    sampler / sampling_steps: synth's sampler (ddpm, ddim, dpmpp2m). gate_failures: what to do with synthetic
    cases that still fail synth's quality gate after its redraws: "fill" (default) uses cases that passed first
    and failures only where a mix needs more, counted in study.json and the log; "exclude" never uses them (the
    study stops if a mix lacks cases); "keep" ignores the gate. parallel: segmenter trainings at once in threads
    (default 2: one per core of our 2-core machines; each uses one torch thread at tiny/demo); dask_address /
    dask_workers: run them on Dask.
    """
    logger = get_run_logger()
    t_start = time.perf_counter()
    study = Path(out).resolve()
    study.mkdir(parents=True, exist_ok=True)
    mix_list = parse_mixes(mixes)
    if gate_failures not in ("fill", "exclude", "keep"):
        raise CohortError(None, f"gate_failures must be 'fill', 'exclude' or 'keep', not {gate_failures!r}",
                          kind="bad-config")
    if medddpm_on not in ("selected", "all"):
        raise CohortError(None, f"medddpm_on must be 'selected' or 'all', not {medddpm_on!r}", kind="bad-config")
    params = dict(cohort_manifest=cohort_manifest, profile=profile, n_cases=n_cases, cohort_seed=cohort_seed,
                  mixes=[m.label for m in mix_list], n_real=n_real, backends=list(backends), seeds=list(seeds),
                  external_test_manifest=external_test_manifest, medddpm_checkpoint=medddpm_checkpoint,
                  medddpm_config=medddpm_config or {}, medddpm_on=medddpm_on, sampler=sampler,
                  sampling_steps=sampling_steps, synth_seed=synth_seed, gate_failures=gate_failures,
                  segmenter_config=segmenter_config or {})
    study_key = "augment-study:" + hash_json(params)[:12]
    stages: dict[str, FileRef] = {}

    # 1. the real cohort, inside the study folder
    if cohort_manifest is None:
        cohort = stages["cohort"] = fresh(tasks.build_phantom, study, str(study / "cohort"), n_cases, cohort_seed,
                                          profile)
    else:
        src = ref(cohort_manifest)
        if study in src.p.parents:
            cohort = src
        else:
            cohort = stages["cohort"] = fresh(tasks.stage_cohort, study, src, str(study / "cohort"))
    selected = stages["select"] = fresh(tasks.select_training_cases, study, cohort, n_real, cohort_seed)
    real_train = case_ids(selected)
    test_ids = case_ids(cohort, source="real", split="test")
    if not test_ids:
        raise CohortError(cohort.p, "the cohort has no real test cases (split=test)", kind="bad-selection")

    # 2. Med-DDPM and exactly the synthetic cases the mixes need
    plan = SynthesisPlan.for_mixes(mix_list, n_real)
    pools: dict[str, FileRef] = {}
    if plan.from_real_masks or plan.from_edited_masks:
        if medddpm_checkpoint:
            checkpoint = ref(medddpm_checkpoint)
        else:
            train_on = selected if medddpm_on == "selected" else cohort
            checkpoint = stages["medddpm"] = fresh(tasks.train_medddpm, study, train_on, profile,
                                                   str(study / "medddpm"), medddpm_config or {})
        if plan.from_real_masks:
            pools["real"] = stages["synthesize-real-masks"] = fresh(
                tasks.synthesize, study, checkpoint, selected, str(study / "synthetic" / "study-real-masks"),
                plan.from_real_masks, sampler, sampling_steps, synth_seed, "study-real-masks")
        if plan.from_edited_masks:
            masks = stages["edit-masks"] = fresh(tasks.edit_masks, study, selected, str(study / "masks"),
                                                 plan.edits_per_case, synth_seed)
            pools["edited"] = stages["synthesize-edited-masks"] = fresh(
                tasks.synthesize, study, checkpoint, masks, str(study / "synthetic" / "study-edited-masks"),
                plan.from_edited_masks, sampler, sampling_steps, synth_seed + 1, "study-edited-masks")
        for name, pool in pools.items():
            registry.register(study, f"study-{name}-masks", pool.p, pool.sha256, kind="study-pool",
                              checkpoint_sha256=checkpoint.sha256, sampler=sampler, steps=sampling_steps)
    manifest = stages["merge"] = fresh(tasks.merge, study, [cohort, *pools.values()], str(study / "data_manifest.csv"))
    ordered = {name: pool_order(pool, gate_failures) for name, pool in pools.items()}
    pool_ids = {name: ids for name, (ids, _) in ordered.items()}
    gate_failed = {name: bad for name, (_, bad) in ordered.items()}

    # 3. one segmenter per (mix, back end, seed), all evaluated on the same real test cases
    seg_profile = SEGMENTER_PROFILE.get(profile, "paper")
    # a non-default segmenter config gets its own run folders, so changing it on a finished study trains new
    # segmenters beside the old ones instead of colliding with them (segment refuses a model_dir of another config)
    variant = f"-cfg{hash_json(segmenter_config)[:6]}" if segmenter_config else ""
    jobs = []
    for mix in mix_list:
        n_r, n_s = mix.counts(n_real)
        synth_ids = pool_ids.get(mix.masks, [])[:n_s]
        n_failed = len(set(synth_ids) & gate_failed.get(mix.masks, set()))
        if n_failed:
            logger.warning(f"mix {mix.label}: {n_failed} of {n_s} synthetic cases failed synth's quality gate "
                           f"(gate_failures={gate_failures!r})")
        if len(synth_ids) < n_s:
            raise CohortError(pools[mix.masks].p, f"mix {mix.label} needs {n_s} synthetic cases but only "
                                                  f"{len(synth_ids)} passed the quality gate (quality_report.csv); "
                                                  f"train Med-DDPM longer or set gate_failures='keep'",
                              kind="quality-gate")
        for backend in backends:
            for seed in seeds:
                run = f"{mix.slug}-{backend}-s{seed}{variant}"
                config = {"profile": seg_profile, **(segmenter_config or {}), "backend": backend, "seed": int(seed)}
                jobs.append({"run": run, "case_ids": real_train[:n_r] + synth_ids, "config": config,
                             "model_dir": str(study / "segmenters" / run),
                             "gate_failed_cases": n_failed,
                             "columns": {"run": run, "mix": mix.label, "n_real": n_r, "n_synth": n_s,
                                         "backend": backend, "seed": int(seed)}})
    test_sets = [{"name": "test", "manifest": manifest, "case_ids": test_ids}]
    if external_test_manifest:
        ext = ref(external_test_manifest)
        ext_ids = case_ids(ext, source="real")
        from cohort.manifest import load_manifest

        name = str(load_manifest(ext.p)["cohort"].dropna().iloc[0]) if ext_ids else "external"
        test_sets.append({"name": name if name != "test" else "external", "manifest": ext, "case_ids": ext_ids})
    runner = segmenter_task_runner(dask_address, dask_workers, parallel)
    t0 = time.perf_counter()
    trained = train_segmenters.with_options(task_runner=runner)(str(study), manifest, jobs, test_sets)
    if not all(r.is_intact() for t in trained for r in (t["model"], *t["evals"])):
        # a cache hit whose files were deleted or changed: redo that fan-out without the cache
        logger.warning("cached segmenter results changed on disk; recomputing them")
        trained = train_segmenters.with_options(task_runner=runner)(str(study), manifest, jobs, test_sets,
                                                                    refresh=True)
    segment_seconds = time.perf_counter() - t0
    run_csvs = [e for t in trained for e in t["evals"]]
    per_case = stages["collect"] = fresh(tasks.collect, study, str(study), run_csvs)

    # synthesis quality and memorisation (eval), with the first real-only MONAI segmenter as the judge
    quality_inputs = []
    judge = next((t for t, j in zip(trained, jobs) if j["columns"]["n_synth"] == 0
                  and j["config"]["backend"] == "monai"), None)
    if pools:
        preds = {}
        if judge is not None:
            for name, pool in pools.items():
                preds[f"study-{name}-masks"] = fresh(
                    tasks.predict, study, judge["model"], pool, pool_ids[name],
                    str(study / "predictions" / f"{judge['run']}--synthetic-{name}-masks"))
        generator_ids = real_train if medddpm_on == "selected" else None
        quality = stages["synthesis-quality"] = fresh(tasks.evaluate_synthesis, study, str(study), cohort,
                                                      generator_ids, list(pools.values()), preds,
                                                      judge["model"] if judge else None)
        quality_inputs.append(quality)

    # 4. study.json (stable across reruns: times are those of the task runs that did the work), report, artifacts
    run_seconds = {t["run"]: t["model"].seconds + sum(e.seconds for e in t["evals"]) for t in trained}
    record = StudyRecord(
        study=study_key, parameters=params,
        cohort=CohortRecord(manifest=str(cohort.p.relative_to(study)) if study in cohort.p.parents else str(cohort.p),
                            sha256=cohort.sha256, n_real_train=len(real_train), train_case_ids=real_train,
                            selected_manifest=str(selected.p.relative_to(study)) if study in selected.p.parents
                            else str(selected.p),
                            n_test=len(test_ids)),
        hashes={name: r.sha256 for name, r in stages.items()},
        checkpoint=CheckpointRecord(path=str(checkpoint.p), sha256=checkpoint.sha256) if pools else None,
        synthetic={name: PoolRecord(manifest=str(p.p.relative_to(study)), sha256=p.sha256, n=len(pool_ids[name]),
                                    gate_failed=len(gate_failed[name]), gate_failures=gate_failures)
                   for name, p in pools.items()},
        runs=[RunRecord(**{k: v for k, v in j.items() if k != "case_ids"}, n_cases=len(j["case_ids"])) for j in jobs],
        test_sets=[TestSetRecord(name=t["name"], manifest=t["manifest"].path, n=len(t["case_ids"])) for t in test_sets],
        wall_seconds={**{name: r.seconds for name, r in stages.items()},
                      "segmenters (train+predict+evaluate, sum over runs)": round(sum(run_seconds.values()), 3)},
        versions=package_versions(),
    )
    study_json = record.write(study)
    report = stages["report"] = fresh(tasks.build_report, study, str(study),
                                      [per_case, ref(study_json), *quality_inputs])
    registry.mark_used(study, [f"study-{name}-masks" for name in pools], study_key)
    registry.rebuild_manifest(study) if pools else None

    publish_artifacts(per_case.p, report.p)
    logger.info(f"study finished in {time.perf_counter() - t_start:.1f} s (segmenter stage {segment_seconds:.1f} s); "
                f"report: {report.p}")
    return {"study_dir": str(study), "per_case": per_case.path, "report": report.path, "study_key": study_key}


def dice_by_mix(per_case_csv: Path):
    """Mean Dice with bootstrap CI per (mix, back end, test set, region) in the paper's row order (eval.stats)."""
    import pandas as pd

    from eval.stats import aggregate

    agg = aggregate(pd.read_csv(per_case_csv))
    cols = ["test_set", "kind", "mix", "n_real", "n_synth", "backend", "region", "n_cases", "n_seeds",
            "dice_mean", "dice_ci_low", "dice_ci_high", "hd95_mean"]
    return agg[[c for c in cols if c in agg.columns]].round(4)


def publish_artifacts(per_case_csv: Path, report_dir: Path) -> None:
    """Table artifact ``dice-by-mix`` and markdown artifact ``augment-study-report`` (stable keys, so the UI
    shows each study run as a new version of the same artifact)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    table = dice_by_mix(per_case_csv)
    create_table_artifact(key=TABLE_KEY, table=json.loads(table.to_json(orient="records")),
                          description="Dice by training mix (mean over test cases and seeds, bootstrap 95% CI)")
    md_file = report_dir / "report.md" if report_dir.is_dir() else report_dir
    text = md_file.read_text() if md_file.exists() else f"Report folder: {report_dir}"
    create_markdown_artifact(key=REPORT_KEY, markdown=text, description=f"augment-study report ({report_dir})")

"""Prefect flows of the augment study: train-medddpm, synthesize-cohort, train-segmenter, augment-study.

augment-study trains (or reuses) Med-DDPM on the study's real training cases, synthesises exactly the cases its
mixes need, trains one segmenter per (mix, back end, seed), evaluates all of them on the same real test split
(and on an optional external test manifest), writes STUDY/results/per_case.csv and study.json, builds the
report (eval.report) and publishes two artifacts: the table ``dice-by-mix`` and the markdown
``augment-study-report``. Layout of STUDY: docs/architecture.md; flow details: docs/flows.md.

The flow reads as its stages: real cohort -> plan (flows.plan.plan_study: selected cases, test sets, pools,
runs, judge; pure) -> generator -> synthetic pools -> segmenters -> evaluation -> study.json and report. Every
step is a cached task (flows/tasks.py) whose results persist under STUDY/.prefect/results: rerunning a finished
study executes no task, and a crashed study resumes at the first task that had not finished.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner

from core.provenance import package_versions
from eval.records import CheckpointRecord, CohortRecord, PoolRecord, RunRecord, StudyRecord, TestSetRecord

# absolute imports: however Prefect loads this file (module path or file path), FileRef and the tasks are the
# classes of the flows package, so cached results of any run validate as parameters of any other run
from flows import registry, tasks
from flows.mixes import DEFAULT_MIXES
from flows.plan import StudyParams, StudyPlan, plan_study, pool_order
from flows.refs import FileRef, ref
from synth.defaults import SAMPLER, STEPS

RESULTS_SUBDIR = Path(".prefect") / "results"
TABLE_KEY = "dice-by-mix"
REPORT_KEY = "augment-study-report"


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


# ---------------------------------------------------------------------------------------------------------------
# single-step flows (also usable on their own, e.g. from the CLI or a deployment)

@flow(name="train-medddpm", log_prints=True)
def train_medddpm_flow(manifest: str, out: str, profile: str = "demo", config: dict | None = None) -> str:
    """Train (or resume) Med-DDPM on a manifest's real training rows; returns the checkpoint path."""
    out_dir = Path(out).resolve()
    return fresh(tasks.train_medddpm, out_dir, ref(manifest), profile, str(out_dir), config or {}).path


@flow(name="synthesize-cohort", log_prints=True)
def synthesize_cohort_flow(checkpoint: str, masks: str, out: str, count: int, sampler: str = SAMPLER,
                           steps: int = STEPS, seed: int = 0, cohort_id: str = "synthetic") -> str:
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

GPU_RESOURCE = {"GPU": 1}  # what a GPU task asks of a Dask worker (workers declare --resources GPU=1 per GPU)


def gpu_submit(task, *args, resources: dict | None = None):
    """task.submit(*args), asking the Dask scheduler for ``resources`` (e.g. GPU_RESOURCE): a worker runs only as
    many such tasks at once as it declares GPUs, whatever its thread count. Without resources (or on the thread
    pool runner) a plain submit."""
    if not resources:
        return task.submit(*args)
    import dask

    with dask.annotate(resources=resources):
        return task.submit(*args)


@flow(name="train-segmenters", log_prints=True)
def train_segmenters(study_dir: str, manifest: FileRef, jobs: list[dict], test_sets: list[dict],
                     refresh: bool = False, resources: dict | None = None) -> list[dict]:
    """Train, predict and evaluate one segmenter per job; the task runner decides where they run. ``resources``:
    what a training and a prediction ask of a Dask worker (GPU_RESOURCE to fan out one per GPU).

    Returns one {"run", "model": FileRef, "evals": [FileRef per test set]} per job."""
    import eval.segmentation  # noqa: F401  (imported here, with the back ends: MONAI's import is not thread-safe)
    from segment.api import preload

    preload(sorted({job["config"]["backend"] for job in jobs}))
    study = Path(study_dir)
    train_t, predict_t, eval_t = (bound(t, study).with_options(refresh_cache=refresh)
                                  for t in (tasks.train_segmenter, tasks.predict, tasks.evaluate))
    # Every training is submitted before any prediction: a task whose inputs are futures waits for them inside a
    # worker thread, so a prediction queued right behind its own training held the second worker idle and the
    # trainings ran one at a time (the default study's 9 trainings took 1078 s on 2 threads instead of ~600 s).
    models = [gpu_submit(train_t, manifest, job["case_ids"], job["model_dir"], job["config"], resources=resources)
              for job in jobs]
    pending = []
    for job, model in zip(jobs, models):
        evals = []
        for ts in test_sets:
            pred_dir = study / "predictions" / (job["run"] if ts["name"] == "test" else f"{job['run']}--{ts['name']}")
            preds = gpu_submit(predict_t, model, ts["manifest"], ts["case_ids"], str(pred_dir), resources=resources)
            run = {**job["columns"], "test_set": ts["name"]}
            out_csv = study / "results" / "runs" / f"{job['run']}--{ts['name']}.csv"
            evals.append(eval_t.submit(preds, ts["manifest"], run, str(out_csv)))
        pending.append((job["run"], model, evals))
    return [{"run": run, "model": model.result(), "evals": [e.result() for e in evals]}
            for run, model, evals in pending]


def available_cores() -> int:
    """CPU cores this process may run on (a container's or a batch job's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def balanced_pool_size(n_jobs: int, cores: int) -> int:
    """Equal, single-threaded jobs at once on ``cores`` cores so that the cores stay busy to the end: the count
    between cores and 2 × cores with the shortest makespan when the running jobs share the cores equally (ties: the
    smaller). 9 trainings on 2 cores: 3 at a time, 4.5 training times, where 2 at a time take 5 (the ninth runs
    alone on one core)."""
    n_jobs, cores = max(1, int(n_jobs)), max(1, int(cores))
    if n_jobs <= cores:
        return n_jobs
    makespan = lambda p: math.ceil(n_jobs / p) * p / cores  # noqa: E731  (rounds × time of one round)
    return min(range(cores, 2 * cores + 1), key=lambda p: (makespan(p), p))


def auto_parallel(jobs: list[dict], cores: int | None = None) -> int:
    """Segmenter trainings at once in the thread pool when ``parallel`` is 0 (the default). Trainings that use one
    torch thread on the CPU (the tiny and demo profiles): balanced_pool_size over the available cores. Otherwise
    (a GPU, nnU-Net, or a profile that uses all of torch's threads): 2."""
    from core.device import resolve_device
    from segment.config import as_config

    cores = cores or available_cores()
    configs = [as_config(dict(j["config"])) for j in jobs]
    # nnU-Net trains in child processes with their own data-augmentation workers: not single-threaded jobs
    one_thread_on_cpu = all(c.backend == "monai" and c.num_threads == 1 and resolve_device(c.device).type == "cpu"
                            for c in configs)
    return balanced_pool_size(len(jobs), cores) if jobs and one_thread_on_cpu else 2


def segmenter_task_runner(dask_address: str | None, dask_workers: int, parallel: int, gpus: int = 0):
    """Where the segmenter trainings run: threads (default), a local Dask cluster of dask_workers processes, an
    existing cluster at dask_address, or, with gpus > 0, one Dask worker per GPU (dask_cuda's LocalCUDACluster,
    which pins each worker to its GPU, when installed; else a LocalCluster whose workers each declare GPU=1)."""
    if dask_address or dask_workers or gpus:
        from prefect_dask import DaskTaskRunner

        if dask_address:  # an existing cluster (e.g. dask-scheduler on a head node; workers with --resources GPU=1)
            return DaskTaskRunner(address=dask_address)
        if gpus:
            try:
                import dask_cuda  # noqa: F401

                return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",
                                      cluster_kwargs={"n_workers": int(gpus), "resources": GPU_RESOURCE,
                                                      "dashboard_address": None})
            except ImportError:
                pass
            return DaskTaskRunner(cluster_kwargs={"n_workers": int(gpus), "threads_per_worker": 1, "processes": True,
                                                  "resources": GPU_RESOURCE, "dashboard_address": None})
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
    seeds: list[int] = [0, 1, 2],
    external_test_manifest: str | None = None,
    medddpm_checkpoint: str | None = None,
    medddpm_config: dict | None = None,
    medddpm_on: str = "selected",
    medddpm_init: str = "shipped",
    sampler: str = SAMPLER,
    sampling_steps: int = STEPS,
    synth_seed: int = 0,
    gate_failures: str = "fill",
    segmenter_config: dict | None = None,
    parallel: int = 0,
    dask_address: str | None = None,
    dask_workers: int = 0,
    device: str = "auto",
    gpus: int = 0,
) -> dict[str, Any]:
    """The augmentation study. Parameters (all JSON, so a deployment run can override any of them):

    out: study folder. cohort_manifest: the real cohort (None = build the embedded phantom cohort with n_cases and
    cohort_seed at ``profile``). mixes: "R:S[@real|@edited]" (flows/mixes.py). n_real: real training cases used
    by every mix (the data-scarce regime). backends: segmenter back ends ("monai", "nnunet"). seeds: one
    segmenter per (mix, back end, seed). external_test_manifest: another real cohort at the same profile,
    evaluated too (test_set = its cohort name). medddpm_checkpoint: reuse a trained model instead of training.
    medddpm_config / segmenter_config: overrides of the libraries' profile defaults. medddpm_on: "selected"
    (Med-DDPM sees only the n_real cases, the honest data-scarce setting) or "all" (every real training case).
    medddpm_init: what Med-DDPM starts from: "shipped" (default: fine-tune the generator the project ships for the
    profile, pre-trained on phantom cases that are not this study's, synth/pretrained.py; from scratch where none
    ships, e.g. tiny), "scratch", or a generator file to fine-tune (e.g. the authors' imported weights).
    sampler / sampling_steps: synth's sampler (ddpm, ddim, dpmpp2m). gate_failures: what to do with synthetic
    cases that still fail synth's quality gate after its redraws: "fill" (default) uses cases that passed first
    and failures only where a mix needs more, counted in study.json and the log; "exclude" never uses them (the
    study stops if a mix lacks cases); "keep" ignores the gate. parallel: segmenter trainings at once in threads
    (default 0 = auto_parallel: at tiny/demo on the CPU, where each uses one torch thread, enough to keep every core
    busy to the end, e.g. 3 for 9 trainings on 2 cores; otherwise 2); dask_address /
    dask_workers: run them on Dask. device: where Med-DDPM, synthesis and the segmenters run (auto = CUDA when
    present; cpu, cuda, cuda:N, mps). gpus: fan the segmenter trainings out one per GPU on Dask (each task asks
    for GPU_RESOURCE; with dask_address the workers must declare it: `dask worker ... --resources GPU=1`).
    """
    params = StudyParams.pick(locals())  # first statement: locals() holds exactly the flow's parameters
    logger = get_run_logger()
    t_start = time.perf_counter()
    study = Path(out).resolve()
    study.mkdir(parents=True, exist_ok=True)
    stages: dict[str, FileRef] = {}  # every cached stage's output: its hash and wall time go to study.json

    cohort = real_cohort(study, params, stages)
    plan = plan_study(params, cohort.p, study)
    selected = stages["select"] = fresh(tasks.select_training_cases, study, cohort, params.n_real, params.cohort_seed)
    runtime = {"device": device} if device != "auto" else {}  # where it runs: not part of what is computed
    checkpoint = generator(study, plan, cohort, selected, stages, runtime)
    pools = synthetic_pools(study, plan, checkpoint, selected, stages, device)
    manifest = stages["merge"] = fresh(tasks.merge, study, [cohort, *pools.values()], str(study / "data_manifest.csv"))
    ordered = {name: pool_order(pool.p, params.gate_failures) for name, pool in pools.items()}
    jobs = [{**j, "config": {**j["config"], **runtime}} for j in plan.jobs(ordered)]
    for job in (j for j in jobs if j["gate_failed_cases"]):
        logger.warning(f"mix {job['columns']['mix']}: {job['gate_failed_cases']} of {job['columns']['n_synth']} "
                       f"synthetic cases failed synth's quality gate (gate_failures={params.gate_failures!r})")
    test_sets = [{"name": t.name, "manifest": ref(t.manifest) if t.manifest else manifest, "case_ids": t.case_ids}
                 for t in plan.test_sets]
    trained, segment_seconds = segmenters(study, manifest, jobs, test_sets,
                                          segmenter_task_runner(dask_address, dask_workers,
                                                                parallel or auto_parallel(jobs), gpus),
                                          GPU_RESOURCE if gpus else None)
    per_case = stages["collect"] = fresh(tasks.collect, study, str(study), [e for t in trained for e in t["evals"]])
    quality = synthesis_quality(study, plan, cohort, pools, ordered, trained, stages)

    record = study_record(study, plan, cohort, selected, checkpoint, pools, ordered, jobs, test_sets, trained, stages)
    report = stages["report"] = fresh(tasks.build_report, study, str(study),
                                      [per_case, ref(record.write(study)), *quality])
    registry.mark_used(study, [p.cohort_id for p in plan.pools], params.study_key)
    registry.rebuild_manifest(study) if pools else None
    publish_artifacts(per_case.p, report.p)
    logger.info(f"study finished in {time.perf_counter() - t_start:.1f} s (segmenter stage {segment_seconds:.1f} s); "
                f"report: {report.p}")
    return {"study_dir": str(study), "per_case": per_case.path, "report": report.path, "study_key": params.study_key}


# ---------------------------------------------------------------------------------------------------------------
# the stages of augment-study (each runs cached tasks; what they make was decided by the plan)

def real_cohort(study: Path, params: StudyParams, stages: dict[str, FileRef]) -> FileRef:
    """The real cohort, inside the study folder: the embedded phantom built there, or the user's staged there."""
    if params.cohort_manifest is None:
        stages["cohort"] = fresh(tasks.build_phantom, study, str(study / "cohort"), params.n_cases,
                                 params.cohort_seed, params.profile)
        return stages["cohort"]
    src = ref(params.cohort_manifest)
    if study in src.p.parents:
        return src
    stages["cohort"] = fresh(tasks.stage_cohort, study, src, str(study / "cohort"))
    return stages["cohort"]


def generator(study: Path, plan: StudyPlan, cohort: FileRef, selected: FileRef,
              stages: dict[str, FileRef], runtime: dict | None = None) -> FileRef | None:
    """The Med-DDPM checkpoint (given, or trained on the selected cases or the whole cohort); None if no mix needs
    synthetic cases."""
    params = plan.params
    if not plan.needs_generator:
        return None
    if params.medddpm_checkpoint:
        return ref(params.medddpm_checkpoint)
    train_on = selected if plan.generator_train_ids is not None else cohort
    stages["medddpm"] = fresh(tasks.train_medddpm, study, train_on, params.profile, str(study / "medddpm"),
                              {**generator_init(params), **params.medddpm_config, **(runtime or {})})
    return stages["medddpm"]


def generator_init(params: StudyParams) -> dict:
    """Med-DDPM config overrides for params.medddpm_init: {} from scratch, else the fine-tuning recipe of
    synth.pretrained with init_from (the shipped generator of the profile, or the given file)."""
    from synth.pretrained import fine_tune_config, shipped_generator

    if params.medddpm_init == "scratch":
        return {}
    init = shipped_generator(params.profile) if params.medddpm_init == "shipped" else ref(params.medddpm_init).p
    return fine_tune_config(params.profile, init) if init is not None else {}


def synthetic_pools(study: Path, plan: StudyPlan, checkpoint: FileRef | None, selected: FileRef,
                    stages: dict[str, FileRef], device: str = "auto") -> dict[str, FileRef]:
    """The planned pools, synthesised and registered: {"real": ..., "edited": ...} (those the mixes need)."""
    params, pools = plan.params, {}
    for pool in plan.pools:
        if pool.name == "edited":
            masks = stages["edit-masks"] = fresh(tasks.edit_masks, study, selected, str(study / "masks"),
                                                 plan.synthesis.edits_per_case, params.synth_seed)
        else:
            masks = selected
        pools[pool.name] = stages[f"synthesize-{pool.name}-masks"] = fresh(
            tasks.synthesize, study, checkpoint, masks, pool.out_dir, pool.count, params.sampler,
            params.sampling_steps, pool.seed, pool.cohort_id, device)
    for pool in plan.pools:
        registry.register(study, pool.cohort_id, pools[pool.name].p, pools[pool.name].sha256, kind="study-pool",
                          checkpoint_sha256=checkpoint.sha256, sampler=params.sampler, steps=params.sampling_steps)
    return pools


def segmenters(study: Path, manifest: FileRef, jobs: list[dict], test_sets: list[dict],
               runner, resources: dict | None = None) -> tuple[list[dict], float]:
    """The train-segmenters subflow on ``runner``; rerun without the cache if a cached result changed on disk.
    Returns its result and the stage's wall seconds."""
    t0 = time.perf_counter()
    fan_out = train_segmenters.with_options(task_runner=runner)
    trained = fan_out(str(study), manifest, jobs, test_sets, resources=resources)
    if not all(r.is_intact() for t in trained for r in (t["model"], *t["evals"])):
        get_run_logger().warning("cached segmenter results changed on disk; recomputing them")
        trained = fan_out(str(study), manifest, jobs, test_sets, refresh=True, resources=resources)
    return trained, time.perf_counter() - t0


def synthesis_quality(study: Path, plan: StudyPlan, cohort: FileRef, pools: dict[str, FileRef],
                      ordered: dict[str, tuple[list[str], set[str]]], trained: list[dict],
                      stages: dict[str, FileRef]) -> list[FileRef]:
    """results/synthesis.csv and memorisation.csv (eval), the plan's judge segmenter predicting every pool;
    [] if the study made no synthetic data."""
    if not pools:
        return []
    judge = next((t for t in trained if t["run"] == plan.judge), None)
    preds = {}
    if judge is not None:
        for name, pool in pools.items():
            preds[f"study-{name}-masks"] = fresh(tasks.predict, study, judge["model"], pool, ordered[name][0],
                                                 str(study / "predictions" / f"{judge['run']}--synthetic-{name}-masks"))
    stages["synthesis-quality"] = fresh(tasks.evaluate_synthesis, study, str(study), cohort, plan.generator_train_ids,
                                        list(pools.values()), preds, judge["model"] if judge else None)
    return [stages["synthesis-quality"]]


def study_record(study: Path, plan: StudyPlan, cohort: FileRef, selected: FileRef, checkpoint: FileRef | None,
                 pools: dict[str, FileRef], ordered: dict[str, tuple[list[str], set[str]]], jobs: list[dict],
                 test_sets: list[dict], trained: list[dict], stages: dict[str, FileRef]) -> StudyRecord:
    """study.json's content. Stable across reruns: the times are those of the task runs that did the work."""
    in_study = lambda r: str(r.p.relative_to(study)) if study in r.p.parents else str(r.p)  # noqa: E731
    run_seconds = {t["run"]: t["model"].seconds + sum(e.seconds for e in t["evals"]) for t in trained}
    return StudyRecord(
        study=plan.params.study_key, parameters=plan.params.as_dict(),
        cohort=CohortRecord(manifest=in_study(cohort), sha256=cohort.sha256, n_real_train=len(plan.train_ids),
                            train_case_ids=plan.train_ids, selected_manifest=in_study(selected),
                            n_test=len(plan.test_ids)),
        hashes={name: r.sha256 for name, r in stages.items()},
        checkpoint=CheckpointRecord(path=str(checkpoint.p), sha256=checkpoint.sha256) if pools else None,
        synthetic={name: PoolRecord(manifest=str(p.p.relative_to(study)), sha256=p.sha256, n=len(ordered[name][0]),
                                    gate_failed=len(ordered[name][1]), gate_failures=plan.params.gate_failures)
                   for name, p in pools.items()},
        runs=[RunRecord(**{k: v for k, v in j.items() if k != "case_ids"}, n_cases=len(j["case_ids"])) for j in jobs],
        test_sets=[TestSetRecord(name=t["name"], manifest=t["manifest"].path, n=len(t["case_ids"])) for t in test_sets],
        wall_seconds={**{name: r.seconds for name, r in stages.items()},
                      "segmenters (train+predict+evaluate, sum over runs)": round(sum(run_seconds.values()), 3)},
        versions=package_versions(),
    )


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
                          description="Dice by training mix (mean over test cases and seeds, 95% CI of a "
                                      "bootstrap over test cases and seeds)")
    md_file = report_dir / "report.md" if report_dir.is_dir() else report_dir
    text = md_file.read_text() if md_file.exists() else f"Report folder: {report_dir}"
    create_markdown_artifact(key=REPORT_KEY, markdown=text, description=f"augment-study report ({report_dir})")

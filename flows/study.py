"""Prefect flows of the augment study: train-medddpm, synthesize-cohort, train-segmenter, augment-study.

augment-study trains (or reuses) Med-DDPM on the study's real training cases, synthesises exactly the cases its
mixes need, trains one segmenter per (mix, back end, seed), evaluates all of them on the same real test split
(and on an optional external test manifest), writes STUDY/results/per_case.csv and study.json, builds the
report (eval.report) and publishes two artifacts: the table ``dice-by-mix`` and the markdown
``augment-study-report``. Layout of STUDY: docs/architecture.md; flow details: docs/flows.md.

The flow reads as its stages: real cohort -> plan (flows.plan.plan_study: selected cases, test sets, pools,
runs, judge; pure) -> generator -> synthetic pools -> segmenters -> evaluation -> study.json and report. Each
stage returns what it made; every step is a cached task (flows/tasks.py, run with tasks.run_cached) whose results
persist under STUDY/.prefect/results: rerunning a finished study executes no task, and a crashed study resumes at
the first task that had not finished. Where the segmenters run: flows/runners.py; study.json and the artifacts:
flows/record.py.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from core.device import cuda_cache_released
from core.lock import folder_lock

# absolute imports: however Prefect loads this file (module path or file path), FileRef and the tasks are the
# classes of the flows package, so cached results of any run validate as parameters of any other run
from cohort.case_list import read_case_list, write_subset
from flows import registry, tasks
from flows.mixes import DEFAULT_MIXES
from flows.plan import StudyParams, StudyPlan, check_generator_choice, plan_study, pool_order, synthesis_steps
from flows.record import publish_artifacts, study_record
from flows.refs import FileRef, ref
from flows.runners import (GPU_RESOURCE, auto_parallel, check_gpu_count, gpu_submit, segmenter_runtime,
                           segmenter_task_runner)
from flows.tasks import run_cached, with_study_storage
from synth.defaults import SAMPLER, STEPS


# ---------------------------------------------------------------------------------------------------------------
# single-step flows (also usable on their own, e.g. from the CLI or a deployment)

@flow(name="train-medddpm", log_prints=True)
def train_medddpm_flow(manifest: str, out: str, profile: str = "demo", config: dict | None = None,
                       preview_every: int = 0) -> str:
    """Train (or resume) Med-DDPM on a manifest's real training rows; returns the checkpoint path. preview_every:
    sample previews every that many steps, each a file and an artifact (flows.tasks.publish_preview); 0: none."""
    out_dir = Path(out).resolve()
    return run_cached(tasks.train_medddpm, out_dir, ref(manifest), profile, str(out_dir), config or {},
                      preview_every=preview_every).path


@flow(name="synthesize-cohort", log_prints=True)
def synthesize_cohort_flow(checkpoint: str, masks: str, out: str, count: int, sampler: str = SAMPLER,
                           steps: int = STEPS, seed: int = 0, cohort_id: str = "synthetic") -> str:
    """Paired image-mask cohort from a checkpoint and a manifest of conditioning masks; returns its manifest."""
    out_dir = Path(out).resolve()
    return run_cached(tasks.synthesize, out_dir, ref(checkpoint), ref(masks), str(out_dir), count, sampler, steps,
                      seed, cohort_id).path


@flow(name="train-segmenter", log_prints=True)
def train_segmenter_flow(manifest: str, case_ids: list[str], out: str, config: dict | None = None) -> str:
    """Train (or resume) one segmenter on the given cases of a manifest; returns the model folder."""
    out_dir = Path(out).resolve()
    return run_cached(tasks.train_segmenter, out_dir, ref(manifest), list(case_ids), str(out_dir), config or {}).path


# ---------------------------------------------------------------------------------------------------------------
# the per-run fan-out (on the task runner of flows.runners.segmenter_task_runner)

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
    train_t, fine_tune_t, predict_t, eval_t = (
        with_study_storage(t, study).with_options(refresh_cache=refresh)
        for t in (tasks.train_segmenter, tasks.fine_tune_segmenter, tasks.predict, tasks.evaluate))
    # Every training is submitted before any prediction: a task whose inputs are futures waits for them inside a
    # worker thread, so a prediction queued right behind its own training held the second worker idle and the
    # trainings ran one at a time (the default study's 9 trainings took 1078 s on 2 threads instead of ~600 s).
    # A fine-tuning (staged arm) takes its pre-training run's model as input; the plan lists it after that run.
    by_run: dict[str, Any] = {}
    for job in jobs:
        if job.get("pretrain_run"):
            by_run[job["run"]] = gpu_submit(fine_tune_t, by_run[job["pretrain_run"]], manifest, job["case_ids"],
                                            job["model_dir"], job["config"], resources=resources)
        else:
            by_run[job["run"]] = gpu_submit(train_t, manifest, job["case_ids"], job["model_dir"], job["config"],
                                            resources=resources)
    pending = []
    for job in jobs:
        model, evals = by_run[job["run"]], []
        if not job.get("evaluate", True):  # a pre-training for a staged arm only: no arm of the study
            pending.append((job["run"], model, evals))
            continue
        for ts in test_sets:
            pred_dir = study / "predictions" / (job["run"] if ts["name"] == "test" else f"{job['run']}--{ts['name']}")
            preds = gpu_submit(predict_t, model, ts["manifest"], ts["case_ids"], str(pred_dir), resources=resources)
            run = {**job["columns"], "test_set": ts["name"]}
            out_csv = study / "results" / "runs" / f"{job['run']}--{ts['name']}.csv"
            evals.append(eval_t.submit(preds, ts["manifest"], run, str(out_csv)))
        pending.append((job["run"], model, evals))
    return [{"run": run, "model": model.result(), "evals": [e.result() for e in evals]}
            for run, model, evals in pending]


# ---------------------------------------------------------------------------------------------------------------


@flow(name="augment-study", log_prints=True)
def augment_study(
    out: str = "runs/default-study",
    cohort_manifest: str | None = None,
    profile: str = "demo",
    n_cases: int = 48,
    cohort_seed: int = 0,
    # list defaults: Prefect shows them as the deployment's parameters; the flow never mutates them
    mixes: list[str] = list(DEFAULT_MIXES),  # noqa: B006
    n_real: int = 8,
    backends: list[str] = ["monai"],  # noqa: B006
    seeds: list[int] = [0, 1, 2],  # noqa: B006
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
    primary: str = "mean",
    holdout_masks: int = 8,
    cases_from: str | None = None,
    parallel: int = 0,
    dask_address: str | None = None,
    dask_workers: int = 0,
    device: str = "auto",
    gpus: int = 0,
    wait: float | None = 0,
    medddpm_preview_every: int = 0,
) -> dict[str, Any]:
    """The augmentation study. Parameters (all JSON, so a deployment run can override any of them):

    out: study folder. cohort_manifest: the real cohort (None = build the embedded phantom cohort with n_cases and
    cohort_seed at ``profile``). mixes: "R:S[@real|@edited]", or "A>B" to pre-train on mix A and fine-tune on B
    (e.g. "0:1>1:0"; flows/mixes.py). n_real: real training cases used
    by every mix (the data-scarce regime). backends: segmenter back ends ("monai", "nnunet"). seeds: one
    segmenter per (mix, back end, seed). external_test_manifest: another real cohort at the same profile,
    evaluated too (test_set = its cohort name). medddpm_checkpoint: reuse a trained model instead of training.
    medddpm_config / segmenter_config: overrides of the libraries' profile defaults. medddpm_on: "selected"
    (Med-DDPM sees only the n_real cases, the honest data-scarce setting) or "all" (every real training case).
    medddpm_init: what Med-DDPM starts from: "shipped" (default: fine-tune the generator the project ships for the
    profile, pre-trained on phantom cases that are not this study's, synth/shipped.py; from scratch where none
    ships, e.g. tiny), "scratch", or a generator file to fine-tune (e.g. the authors' imported weights).
    sampler "distilled": medddpm_checkpoint is a student of `medddpm distill`, used as is, at its own steps.
    sampler / sampling_steps: synth's sampler (ddpm, ddim, dpmpp2m). gate_failures: what to do with synthetic
    cases that still fail synth's quality gate after its redraws: "fill" (default) uses cases that passed first
    and failures only where a mix needs more, counted in study.json and the log; "exclude" never uses them (the
    study stops if a mix lacks cases); "keep" ignores the gate. holdout_masks: masks of real cases the generator
    never sees, synthesised once each for the fidelity and memorisation references (flows.plan.HoldoutPlan; never
    used by a segmenter; 0: none). cases_from: a case list (one ID per line, cohort.case_list): the study uses only
    the listed rows of the real cohort, records the list's sha256 in study.json and names it in the report.
    parallel: segmenter trainings at once in threads
    (default 0 = flows.runners.auto_parallel: at tiny/demo on the CPU, where each uses one torch thread, enough to
    keep every core busy to the end, e.g. 3 for 9 trainings on 2 cores; otherwise 2); dask_address / dask_workers:
    run them on Dask. device: where Med-DDPM, synthesis and the segmenters run (auto = CUDA when
    present; cpu, cuda, cuda:N, mps). gpus: fan the segmenter trainings out one per GPU on Dask (each task asks
    for GPU_RESOURCE; with dask_address the workers must declare it: `dask worker ... --resources GPU=1`); each
    worker sees only its own GPU, where a segmenter runs on plain cuda (cuda:N names the flow process's GPU).
    wait: if another run owns ``out`` (core.lock), seconds to wait for it (None: as long as it takes; 0: stop at
    once naming the owner); where it runs, not what it computes, so not a StudyParams field nor in the study key.
    medddpm_preview_every: Med-DDPM training previews every that many steps (synth.preview; PNG files in
    medddpm/previews/ and an artifact each); 0 (default): none. They change nothing computed: not in the study key.
    """
    params = StudyParams.pick(locals())  # first statement: locals() holds exactly the flow's parameters
    check_gpu_count(gpus, dask_address)  # before any work (and before the lock creates the folder)
    check_generator_choice(params)  # a distilled student: sampled with its own steps, never fine-tuned
    with folder_lock(out, wait, what="augment-study flow"):  # the CLI's lock, taken again in the same process
        return _run_study(params, out, parallel, dask_address, dask_workers, device, gpus, medddpm_preview_every)


def _run_study(params: StudyParams, out: str, parallel: int, dask_address: str | None, dask_workers: int,
               device: str, gpus: int, preview_every: int = 0) -> dict[str, Any]:
    """augment_study's stages, run while the study folder is held."""
    t_start = time.perf_counter()
    study = Path(out).resolve()
    study.mkdir(parents=True, exist_ok=True)
    runtime = {"device": device} if device != "auto" else {}  # where it runs: not part of what is computed

    cohort = real_cohort(study, params)
    subset = read_case_list(params.cases_from) if params.cases_from is not None else None
    if subset is not None:  # a curated subset: the listed rows of the real cohort, beside it (cohort.case_list)
        cohort = ref(write_subset(cohort.path, subset))
    plan = plan_study(params, cohort.path, study)
    selected = run_cached(tasks.select_training_cases, study, cohort, params.n_real, params.cohort_seed)
    checkpoint = generator(study, plan, cohort, selected, runtime, preview_every)
    masks = edited_masks(study, plan, selected)
    pools = synthetic_pools(study, plan, checkpoint, selected, masks, device)
    holdout = holdout_pool(study, plan, checkpoint, cohort, device)
    manifest = run_cached(tasks.merge, study, [cohort, *pools.values()], str(study / "data_manifest.csv"))
    pool_orders = {name: pool_order(pool.path, params.gate_failures) for name, pool in pools.items()}
    jobs = segmenter_jobs(plan, pool_orders, segmenter_runtime(runtime, gpus))
    test_sets = evaluation_sets(plan, manifest)
    runner = segmenter_task_runner(dask_address, dask_workers, parallel or auto_parallel(jobs), gpus)
    trained, segment_seconds = segmenters(study, manifest, jobs, test_sets, runner, GPU_RESOURCE if gpus else None)
    per_case = run_cached(tasks.collect, study, str(study), [e for t in trained for e in t["evals"]])
    quality = synthesis_quality(study, plan, cohort, pools, pool_orders, trained, holdout)

    # study.json records each stage's hash and wall time by these names (None: the stage did not run)
    stages = {"cohort": cohort, "select": selected, "medddpm": checkpoint, "edit-masks": masks,
              **{f"synthesize-{name}-masks": pool for name, pool in pools.items()},
              "synthesize-holdout-masks": holdout, "merge": manifest,
              "collect": per_case, "synthesis-quality": quality}
    record = study_record(study, plan, stages, cohort=cohort, checkpoint=checkpoint, pools=pools,
                          pool_orders=pool_orders, jobs=jobs, test_sets=test_sets, trained=trained, holdout=holdout,
                          case_list=subset.record() if subset is not None else None)
    report = run_cached(tasks.build_report, study, str(study),
                        [per_case, ref(record.write(study)), *([quality] if quality else [])])
    registry.mark_used(study, [p.cohort_id for p in plan.pools], params.study_key)
    if pools:
        registry.rebuild_manifest(study)
    publish_artifacts(per_case.path, report.path)
    get_run_logger().info(f"study finished in {time.perf_counter() - t_start:.1f} s (segmenter stage "
                          f"{segment_seconds:.1f} s); report: {report.path}")
    return {"study_dir": str(study), "per_case": per_case.path, "report": report.path, "study_key": params.study_key}


# ---------------------------------------------------------------------------------------------------------------
# the stages of augment-study (each runs cached tasks and returns what they made; what to make is the plan's)

def real_cohort(study: Path, params: StudyParams) -> FileRef:
    """The real cohort, inside the study folder: the embedded phantom built there, the user's staged there, or the
    user's as it is if it already lies inside the study."""
    if params.cohort_manifest is None:
        return run_cached(tasks.build_phantom, study, str(study / "cohort"), params.n_cases, params.cohort_seed,
                          params.profile)
    src = ref(params.cohort_manifest)
    if study in Path(src.path).parents:
        return src
    return run_cached(tasks.stage_cohort, study, src, str(study / "cohort"))


def generator(study: Path, plan: StudyPlan, cohort: FileRef, selected: FileRef,
              runtime: dict | None = None, preview_every: int = 0) -> FileRef | None:
    """The Med-DDPM checkpoint (given, or trained on the selected cases or the whole cohort); None if no mix needs
    synthetic cases. It trains in the flow process, which then gives the GPU memory it cached back (a segmenter
    worker may share the GPU)."""
    params = plan.params
    if not plan.needs_generator:
        return None
    if params.medddpm_checkpoint:
        return ref(params.medddpm_checkpoint)
    train_on = selected if plan.generator_train_ids is not None else cohort
    with cuda_cache_released():
        return run_cached(tasks.train_medddpm, study, train_on, params.profile, str(study / "medddpm"),
                          {**generator_init(params), **params.medddpm_config, **(runtime or {})},
                          preview_every=preview_every)


def generator_init(params: StudyParams) -> dict:
    """Med-DDPM config overrides for params.medddpm_init: {} from scratch, else the fine-tuning recipe of
    synth.shipped with init_from (the shipped generator of the profile, or the given file)."""
    from synth.shipped import fine_tune_config, shipped_generator

    if params.medddpm_init == "scratch":
        return {}
    if params.medddpm_init == "shipped":
        init = shipped_generator(params.profile)
    else:
        init = Path(ref(params.medddpm_init).path)
    return fine_tune_config(params.profile, init) if init is not None else {}


def edited_masks(study: Path, plan: StudyPlan, selected: FileRef) -> FileRef | None:
    """Edited versions of the selected cases' masks (cohort.maskedit) if a planned pool is conditioned on them."""
    if not any(pool.name == "edited" for pool in plan.pools):
        return None
    return run_cached(tasks.edit_masks, study, selected, str(study / "masks"), plan.synthesis.edits_per_case,
                      plan.params.synth_seed)


def synthetic_pools(study: Path, plan: StudyPlan, checkpoint: FileRef | None, selected: FileRef,
                    edited: FileRef | None, device: str = "auto") -> dict[str, FileRef]:
    """The planned pools, synthesised and registered: {"real": ..., "edited": ...} (those the mixes need), each
    conditioned on the selected cases' masks or on their edited versions. Synthesis runs in the flow process,
    which then gives the GPU memory it cached back."""
    params, pools = plan.params, {}
    steps = synthesis_steps(params)  # a distilled student's own steps: read from its card once
    with cuda_cache_released():
        for pool in plan.pools:
            masks = edited if pool.name == "edited" else selected
            pools[pool.name] = run_cached(tasks.synthesize, study, checkpoint, masks, pool.out_dir, pool.count,
                                          params.sampler, steps, pool.seed, pool.cohort_id, device)
    for pool in plan.pools:
        made = pools[pool.name]
        registry.register(study, pool.cohort_id, made.path, made.sha256, kind="study-pool",
                          checkpoint_sha256=checkpoint.sha256, sampler=params.sampler, steps=steps)
    return pools


def holdout_pool(study: Path, plan: StudyPlan, checkpoint: FileRef | None, cohort: FileRef,
                 device: str = "auto") -> FileRef | None:
    """One sample on each held-out mask of the plan (flows.plan.HoldoutPlan), for the fidelity and memorisation
    references; None when the plan has none. Not registered as a study pool and not merged into the manifest the
    segmenters read: no mix can take it."""
    if plan.holdout is None or checkpoint is None:
        return None
    h, params = plan.holdout, plan.params
    with cuda_cache_released():
        return run_cached(tasks.synthesize_holdout, study, checkpoint, cohort, h.mask_ids, h.out_dir,
                          params.sampler, synthesis_steps(params), h.seed, h.cohort_id, device)


def segmenter_jobs(plan: StudyPlan, pool_orders: dict[str, tuple[list[str], set[str]]],
                   runtime: dict) -> list[dict]:
    """The train-segmenters jobs: the plan's runs with their case ids (StudyPlan.jobs) and where they run; logs
    each mix that uses synthetic cases which failed synth's quality gate."""
    jobs = [{**j, "config": {**j["config"], **runtime}} for j in plan.jobs(pool_orders)]
    for job in (j for j in jobs if j["gate_failed_cases"]):
        get_run_logger().warning(f"mix {job['columns']['mix']}: {job['gate_failed_cases']} of "
                                 f"{job['columns']['n_synth']} synthetic cases failed synth's quality gate "
                                 f"(gate_failures={plan.params.gate_failures!r})")
    return jobs


def evaluation_sets(plan: StudyPlan, manifest: FileRef) -> list[dict]:
    """The planned test sets as train-segmenters takes them; the study's own split reads the merged manifest."""
    return [{"name": t.name, "manifest": ref(t.manifest) if t.manifest else manifest, "case_ids": t.case_ids}
            for t in plan.test_sets]


def segmenters(study: Path, manifest: FileRef, jobs: list[dict], test_sets: list[dict],
               runner, resources: dict | None = None) -> tuple[list[dict], float]:
    """The train-segmenters subflow on ``runner``; rerun without the cache if a cached result changed on disk.
    Returns its result and the stage's wall seconds."""
    t0 = time.perf_counter()
    trained = run_cached(train_segmenters.with_options(task_runner=runner), study, str(study), manifest, jobs,
                         test_sets, resources=resources)
    return trained, time.perf_counter() - t0


def synthesis_quality(study: Path, plan: StudyPlan, cohort: FileRef, pools: dict[str, FileRef],
                      pool_orders: dict[str, tuple[list[str], set[str]]], trained: list[dict],
                      holdout: FileRef | None = None) -> FileRef | None:
    """results/synthesis.csv and memorisation.csv (eval), the plan's judge segmenter predicting every pool; with
    the held-out pool, its fidelity against the other held-out real cases and the memorisation baseline. None if
    the study made no synthetic data."""
    if not pools:
        return None
    judge = next((t for t in trained if t["run"] == plan.judge), None)
    preds = {}
    if judge is not None:
        for name, pool in pools.items():
            preds[f"study-{name}-masks"] = run_cached(
                tasks.predict, study, judge["model"], pool, pool_orders[name][0],
                str(study / "predictions" / f"{judge['run']}--synthetic-{name}-masks"))
    return run_cached(tasks.evaluate_synthesis, study, str(study), cohort, plan.generator_train_ids,
                      list(pools.values()), preds, judge["model"] if judge else None, holdout,
                      plan.holdout.reference_ids if holdout is not None else None)

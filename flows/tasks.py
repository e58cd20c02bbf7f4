"""Thin Prefect tasks around the libraries. Each takes and returns paths plus content hashes (FileRef) and
plain parameters, so Prefect's INPUTS cache policy keys every result on the content it was computed from.

The science lives in cohort/, synth/, segment/ and eval/; a task calls one library function and returns the
path it wrote, which ``@timed`` turns into a FileRef (content hash and wall time). Three also write a small file
so that their result is one hashable file: predict (an index predictions.json), evaluate (the run's scores with
the run's columns in front) and collect (per_case.csv from the runs' scores). The libraries resume their own
partial work (Med-DDPM and segmenters from their last checkpoint, synthesis, mask editing and the phantom from
the cases already written), so a task that crashed and is retried, or rerun by a later flow run, continues where
the library stopped. ``run_cached`` runs a task with its results stored in the study folder and recomputes a
cache hit whose files changed.
"""
from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from core.errors import InputError, MedDDPMError
from core.fsutil import atomic_write_text

from .refs import FileRef, damaged_refs, hash_path, ref

# Key = task inputs (FileRefs carry content hashes) + the task's source code. Prefect's default also adds the
# flow run id, which would make every new run recompute everything; we leave that out on purpose.
CACHE_POLICY = INPUTS + TASK_SOURCE


def is_transient(task, task_run, state) -> bool:
    """Retry only failures that a second attempt can fix (I/O, a killed worker), never bad input (InputError),
    bad settings (ConfigError) or bugs."""
    try:
        state.result()
    except (MedDDPMError, ValueError, TypeError, KeyError, AttributeError, ImportError, NotImplementedError):
        return False
    except Exception:
        return True
    return False


STUDY_TASK = dict(cache_policy=CACHE_POLICY, persist_result=True, retries=2, retry_delay_seconds=5,
                  retry_condition_fn=is_transient)


def timed(fn):
    """A task body that returns the path it wrote becomes one that returns ``ref(path, seconds)``: the path's
    content hash and the body's wall time (study.json's wall_seconds)."""
    @functools.wraps(fn)
    def run(*args, **kwargs) -> FileRef:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        return ref(out, time.perf_counter() - t0)
    return run


# ---------------------------------------------------------------------------------------------------------------
# running a task in a study folder

RESULTS_SUBDIR = Path(".prefect") / "results"


def results_storage(study_dir: str | Path) -> Path:
    """Task results and cache records live inside the study: deleting the folder forgets the cache too."""
    return (Path(study_dir) / RESULTS_SUBDIR).resolve()


def with_study_storage(task_, study_dir: str | Path):
    """``task_`` with its results stored in the study folder (results_storage)."""
    return task_.with_options(result_storage=results_storage(study_dir))


# How to rebuild a stage's output whose library resume keeps what it finds (it checks no hashes): said when a rerun
# of the task still leaves a damaged file. Med-DDPM training and synthesis verify and repair on resume themselves.
REBUILD = {
    "build-phantom-cohort": "delete {folder} and rerun the same command: the phantom cohort is rebuilt with the same "
                            "bytes (make study checks them against data_manifest.csv)",
    "stage-cohort": "the staged file is a hard link (or copy) of your cohort's: restore that file from your source "
                    "data, then rerun",
    "edit-masks": "delete {folder} and rerun the same command: the masks are edited again with the same seed",
}
DEFAULT_REBUILD = "restore it, or delete {folder} and rerun the same command to make it again"


def run_cached(task_, study_dir: str | Path, *args, **kwargs):
    """Run a task with its results in the study folder. A cache hit whose files were deleted or changed since
    (flows.refs.damaged_refs: the result's files, and the files a manifest or index lists with their sha256) is
    run again; if that run still returns damaged files (a library resume that reused them), InputError names the
    first one and how to rebuild it, instead of handing damaged data to the next stage.

    ``task_`` may also be a subflow of cached tasks (train-segmenters) that takes ``refresh``: it is run again
    with refresh=True (its tasks store their results in the study folder themselves)."""
    from prefect import Flow

    is_flow = isinstance(task_, Flow)
    t = task_ if is_flow else with_study_storage(task_, study_dir)
    out = t(*args, **kwargs)
    damage = damaged_refs(out)
    if damage:
        f, problem = damage[0]
        more = f" (and {len(damage) - 1} more)" if len(damage) > 1 else ""
        get_run_logger().warning(f"{task_.name}: cached result is damaged: {f}: {problem}{more}; recomputing")
        out = t(*args, **{**kwargs, "refresh": True}) if is_flow else t.with_options(refresh_cache=True)(*args,
                                                                                                          **kwargs)
        refuse_damaged(task_.name, out)
    return out


def refuse_damaged(stage: str, result) -> None:
    """InputError naming the first damaged file of ``result`` (a FileRef or lists/dicts of them) and how to
    rebuild it; nothing if it is intact."""
    for made in (r for r in _file_refs(result) if r.damage()):
        f, problem = made.damage()[0]
        folder = Path(made.path) if Path(made.path).is_dir() else Path(made.path).parent  # what the stage wrote
        hint = REBUILD.get(stage, DEFAULT_REBUILD).format(folder=folder)
        raise InputError(f, f"{problem}; the {stage} stage reused it on resume. {hint}", kind="damaged")


def _file_refs(result) -> list[FileRef]:
    if isinstance(result, FileRef):
        return [result]
    values = result.values() if isinstance(result, dict) else result if isinstance(result, (list, tuple)) else []
    return [r for v in values for r in _file_refs(v)]


# ---------------------------------------------------------------------------------------------------------------
# cohort

@task(name="build-phantom-cohort", **STUDY_TASK)
@timed
def build_phantom(out_dir: str, n_cases: int, seed: int, profile: str) -> Path:
    from cohort.phantom import build_phantom_cohort

    return build_phantom_cohort(out_dir, n_cases=n_cases, seed=seed, profile=profile)


@task(name="stage-cohort", **STUDY_TASK)
@timed
def stage_cohort(manifest: FileRef, out_dir: str) -> Path:
    """A user's cohort inside the study folder (cohort.staging: hard links, else copies)."""
    from cohort.staging import stage_cohort as _stage

    return _stage(manifest.path, out_dir)


@task(name="select-training-cases", **STUDY_TASK)
@timed
def select_training_cases(manifest: FileRef, n_real: int, seed: int) -> Path:
    """The n_real real training cases every mix uses (cohort.selection), as a manifest beside the cohort's."""
    from cohort.selection import write_training_selection

    return write_training_selection(manifest.path, n_real, seed)


@task(name="edit-masks", **STUDY_TASK)
@timed
def edit_masks(manifest: FileRef, out_dir: str, n_per_case: int, seed: int) -> Path:
    from cohort.maskedit import edit_masks as _edit

    return _edit(manifest.path, out_dir, n_per_case=n_per_case, seed=seed, split="train")


@task(name="merge-manifests", **STUDY_TASK)
@timed
def merge(manifests: list[FileRef], out: str) -> str:
    from cohort.manifest import merge_manifests

    merge_manifests([m.path for m in manifests], out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# synth

PREVIEW_ARTIFACT = "medddpm-training-preview"  # key: each preview of a run is a new version of one artifact


def publish_preview(png: Path, step: int, steps: int) -> None:
    """A Med-DDPM training preview (synth.preview) as a Prefect markdown artifact naming the PNG file: the UI
    cannot show a file of the machine that trains (a browser refuses file:// images), so it links and names it."""
    from prefect.artifacts import create_markdown_artifact

    png = Path(png).resolve()
    create_markdown_artifact(
        key=PREVIEW_ARTIFACT, description=f"Med-DDPM training preview, step {step} of {steps}",
        markdown=f"**Med-DDPM training preview, step {step} of {steps}**: samples of the EMA weights on fixed masks "
                 f"beside the masks' real images, and the loss curve.\n\nFile: [`{png}`]({png.as_uri()}) (the newest "
                 f"preview is always `{png.parent / 'latest.png'}`)")


# preview_every is left out of the cache key: previews change nothing that is trained
@task(name="train-medddpm", **{**STUDY_TASK, "cache_policy": (INPUTS - "preview_every") + TASK_SOURCE})
@timed
def train_medddpm(manifest: FileRef, profile: str, out_dir: str, config: dict, preview_every: int = 0) -> Path:
    """synth.train.train_medddpm; preview_every > 0: previews every that many steps (synth.preview), each also
    published as an artifact (publish_preview)."""
    from synth.train import train_medddpm as _train

    if not preview_every:
        return _train(manifest.path, profile, out_dir, config)
    from synth.preview import PreviewConfig

    return _train(manifest.path, profile, out_dir, config, preview=PreviewConfig(every=preview_every),
                  on_preview=publish_preview)


@task(name="synthesize-cohort", **STUDY_TASK)
@timed
def synthesize(checkpoint: FileRef, masks: FileRef, out_dir: str, count: int, sampler: str, steps: int,
               seed: int, cohort_id: str, device: str = "auto") -> Path:
    from synth.synthesize import SynthesisConfig, synthesize_cohort

    # masks holds either real rows (their labels) or edited masks (source=mask); ids prefixed with the
    # cohort id stay unique when cohorts are merged into one manifest
    return synthesize_cohort(checkpoint.path, masks.path, out_dir, SynthesisConfig(
        count=count, sampler=sampler, steps=steps, seed=seed, cohort_name=cohort_id, case_prefix=f"{cohort_id}_",
        device=device))


# ---------------------------------------------------------------------------------------------------------------
# segment + eval

@task(name="train-segmenter", **STUDY_TASK)
@timed
def train_segmenter(manifest: FileRef, case_ids: list[str], out_dir: str, config: dict) -> Path:
    from segment.api import train

    return train(manifest.path, case_ids, out_dir, config)


@task(name="fine-tune-segmenter", **STUDY_TASK)
@timed
def fine_tune_segmenter(pretrained: FileRef, manifest: FileRef, case_ids: list[str], out_dir: str,
                        config: dict) -> Path:
    """train_segmenter starting from the weights of a finished segmenter (a staged arm's pre-training run): its
    model.safetensors and sha256 enter the config (segment.api.pretrained_init), so other weights train anew."""
    from segment.api import pretrained_init, train

    return train(manifest.path, case_ids, out_dir, {**config, **pretrained_init(pretrained.path)})


@task(name="predict", **STUDY_TASK)
@timed
def predict(model: FileRef, manifest: FileRef, case_ids: list[str], out_dir: str) -> Path:
    """Predict and write predictions.json ({case_id: file name}) so that the result is one hashable file."""
    from segment.api import predict as _predict

    preds = _predict(model.path, manifest.path, case_ids, out_dir)
    index = {cid: Path(p).resolve().relative_to(Path(out_dir).resolve()).as_posix() for cid, p in preds.items()}
    listing = {cid: {"file": f, "sha256": hash_path(Path(out_dir) / f)} for cid, f in sorted(index.items())}
    target = Path(out_dir) / "predictions.json"
    atomic_write_text(target, json.dumps(listing, indent=1, sort_keys=True) + "\n")
    return target


def read_predictions(predictions: FileRef) -> dict[str, Path]:
    index = Path(predictions.path)
    return {cid: index.parent / v["file"] for cid, v in json.loads(index.read_text()).items()}


@task(name="evaluate", **STUDY_TASK)
@timed
def evaluate(predictions: FileRef, manifest: FileRef, run: dict, out_csv: str) -> str:
    """Dice/HD95 per case and region, with the run's columns (run, mix, n_real, ... test_set) in front."""
    from eval.segmentation import evaluate_predictions

    scores = evaluate_predictions(read_predictions(predictions), manifest.path)
    for i, (k, v) in enumerate(run.items()):
        scores.insert(i, k, v)
    atomic_write_text(out_csv, scores.to_csv(index=False))
    return out_csv


@task(name="collect-results", **STUDY_TASK)
@timed
def collect(study_dir: str, results: list[FileRef]) -> Path:
    """STUDY/results/per_case.csv from every run's scores (eval.results.write_results checks the columns)."""
    from eval.results import write_results

    df = pd.concat([pd.read_csv(r.path) for r in results], ignore_index=True)
    return write_results(study_dir, per_case=df, append=False)["per_case"]


@task(name="synthesize-holdout-masks", **STUDY_TASK)
@timed
def synthesize_holdout(checkpoint: FileRef, cohort: FileRef, mask_ids: list[str], out_dir: str, sampler: str,
                       steps: int, seed: int, cohort_id: str, device: str = "auto") -> Path:
    """One sample on the mask of each held-out real case (any split): the fidelity and memorisation references of
    flows.plan.HoldoutPlan, never used to train a segmenter."""
    from synth.synthesize import SynthesisConfig, synthesize_cohort

    return synthesize_cohort(checkpoint.path, cohort.path, out_dir, SynthesisConfig(
        count=len(mask_ids), sampler=sampler, steps=steps, seed=seed, sources=("real",), splits=None,
        case_ids=tuple(mask_ids), cohort_name=cohort_id, case_prefix=f"{cohort_id}_", device=device))


@task(name="evaluate-synthesis", **STUDY_TASK)
@timed
def evaluate_synthesis(study_dir: str, real: FileRef, train_ids: list[str] | None, pools: list[FileRef],
                       predictions: dict[str, FileRef], judge: FileRef | None, holdout: FileRef | None = None,
                       holdout_reference_ids: list[str] | None = None) -> Path:
    """results/synthesis.csv and results/memorisation.csv (eval.results.evaluate_synthesis) for every synthetic
    cohort of the study, plus the held-out fidelity rows (eval.synthesis.fidelity_table) when the study made a
    held-out pool. ``real``: the real cohort; ``train_ids``: the real cases Med-DDPM trained on (None: every real
    training case); ``pools`` and ``holdout`` only key the cache. ``predictions``: the real-only segmenter's
    predictions on each synthetic pool (semantic consistency); ``judge``: its model folder (named in those rows).
    ``holdout_reference_ids``: the held-out real cases the held-out samples are compared with."""
    from eval.results import evaluate_synthesis as _evaluate
    from eval.results import write_results
    from eval.synthesis import fidelity_table

    kw = {"segmenter": f"real-only segmenter {Path(judge.path).name}"} if judge is not None else {}
    written = _evaluate(study_dir, real_manifest=real.path, train_ids=train_ids,
                        predictions={k: read_predictions(v) for k, v in predictions.items()}, **kw)
    if holdout is not None and holdout_reference_ids:
        fid = fidelity_table(real.path, holdout.path, reference_ids=holdout_reference_ids,
                             synthetic_id=Path(holdout.path).parent.name)
        written = write_results(study_dir, synthesis=fid)
    return written["synthesis"]


@task(name="build-report", **STUDY_TASK)
@timed
def build_report(study_dir: str, inputs: list[FileRef]) -> Path:
    """eval.report builds the report from the study folder; ``inputs`` (per_case.csv, study.json, ...) only key
    the cache, so an unchanged study is not re-reported."""
    from eval.report import build_report as _build

    return _build(study_dir)

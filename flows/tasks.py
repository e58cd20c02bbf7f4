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

from core.errors import MedDDPMError
from core.fsutil import atomic_write_text

from .refs import FileRef, hash_path, ref

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


def run_cached(task_, study_dir: str | Path, *args, **kwargs) -> FileRef:
    """Run a task with its results in the study folder; a cache hit whose files were deleted or changed since
    (FileRef.is_intact) is run again."""
    t = with_study_storage(task_, study_dir)
    out = t(*args, **kwargs)
    if not out.is_intact():
        get_run_logger().warning(f"{task_.name}: cached result {out.path} is missing or changed; recomputing")
        out = t.with_options(refresh_cache=True)(*args, **kwargs)
    return out


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

@task(name="train-medddpm", **STUDY_TASK)
@timed
def train_medddpm(manifest: FileRef, profile: str, out_dir: str, config: dict) -> Path:
    from synth.train import train_medddpm as _train

    return _train(manifest.path, profile, out_dir, config)


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


@task(name="evaluate-synthesis", **STUDY_TASK)
@timed
def evaluate_synthesis(study_dir: str, real: FileRef, train_ids: list[str] | None, pools: list[FileRef],
                       predictions: dict[str, FileRef], judge: FileRef | None) -> Path:
    """results/synthesis.csv and results/memorisation.csv (eval.results.evaluate_synthesis). ``real``: the real
    cohort; ``train_ids``: the real cases Med-DDPM trained on (None: every real training case); ``pools`` only key
    the cache. ``predictions``: the real-only segmenter's predictions on each synthetic pool (semantic
    consistency); ``judge``: its model folder, whose encoder also gives the features of the Fréchet distance."""
    from eval.results import evaluate_synthesis as _evaluate

    kw = {}
    if judge is not None:
        from segment.monai_backend import encoder_features, load_model

        model, cfg = load_model(judge.path)
        name = Path(judge.path).name
        kw = dict(feature_fn=functools.partial(encoder_features, (model, cfg)),
                  feature_extractor=f"{type(model).__name__} bottleneck of the real-only segmenter {name} "
                                    f"(trained in this study)",
                  segmenter=f"real-only segmenter {name}")
    written = _evaluate(study_dir, real_manifest=real.path, train_ids=train_ids,
                        predictions={k: read_predictions(v) for k, v in predictions.items()}, **kw)
    return written["synthesis"]


@task(name="build-report", **STUDY_TASK)
@timed
def build_report(study_dir: str, inputs: list[FileRef]) -> Path:
    """eval.report builds the report from the study folder; ``inputs`` (per_case.csv, study.json, ...) only key
    the cache, so an unchanged study is not re-reported."""
    from eval.report import build_report as _build

    return _build(study_dir)

"""Thin Prefect tasks around the libraries. Each takes and returns paths plus content hashes (FileRef) and
plain parameters, so Prefect's INPUTS cache policy keys every result on the content it was computed from.

The science lives in cohort/, synth/, segment/ and eval/; a task calls one library function, times it and
hashes what it wrote. Three also write a small file so that their result is one hashable file: predict (an
index predictions.json), evaluate (the run's scores with the run's columns in front) and collect (per_case.csv
from the runs' scores). The libraries resume their own partial work (Med-DDPM and segmenters from their last
checkpoint, synthesis, mask editing and the phantom from the cases already written), so a task that crashed
and is retried, or rerun by a later flow run, continues where the library stopped.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from prefect import task
from prefect.cache_policies import INPUTS, TASK_SOURCE

from core.errors import MedDDPMError
from core.fsutil import atomic_write_text

from .refs import FileRef, ref

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


class _Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


# ---------------------------------------------------------------------------------------------------------------
# cohort

@task(name="build-phantom-cohort", **STUDY_TASK)
def build_phantom(out_dir: str, n_cases: int, seed: int, profile: str) -> FileRef:
    from cohort.phantom import build_phantom_cohort

    with _Timer() as t:
        manifest = build_phantom_cohort(out_dir, n_cases=n_cases, seed=seed, profile=profile)
    return ref(manifest, t.seconds)


@task(name="stage-cohort", **STUDY_TASK)
def stage_cohort(manifest: FileRef, out_dir: str) -> FileRef:
    """A user's cohort inside the study folder (cohort.staging: hard links, else copies)."""
    from cohort.staging import stage_cohort as _stage

    with _Timer() as t:
        target = _stage(manifest.p, out_dir)
    return ref(target, t.seconds)


@task(name="select-training-cases", **STUDY_TASK)
def select_training_cases(manifest: FileRef, n_real: int, seed: int) -> FileRef:
    """The n_real real training cases every mix uses (cohort.selection), as a manifest beside the cohort's."""
    from cohort.selection import write_training_selection

    with _Timer() as t:
        out = write_training_selection(manifest.p, n_real, seed)
    return ref(out, t.seconds)


@task(name="edit-masks", **STUDY_TASK)
def edit_masks(manifest: FileRef, out_dir: str, n_per_case: int, seed: int) -> FileRef:
    from cohort.maskedit import edit_masks as _edit

    with _Timer() as t:
        out = _edit(manifest.p, out_dir, n_per_case=n_per_case, seed=seed, split="train")
    return ref(out, t.seconds)


@task(name="merge-manifests", **STUDY_TASK)
def merge(manifests: list[FileRef], out: str) -> FileRef:
    from cohort.manifest import merge_manifests

    with _Timer() as t:
        merge_manifests([m.p for m in manifests], out)
    return ref(out, t.seconds)


# ---------------------------------------------------------------------------------------------------------------
# synth

@task(name="train-medddpm", **STUDY_TASK)
def train_medddpm(manifest: FileRef, profile: str, out_dir: str, config: dict) -> FileRef:
    from synth.train import train_medddpm as _train

    with _Timer() as t:
        ckpt = _train(manifest.p, profile, out_dir, config)
    return ref(ckpt, t.seconds)


@task(name="synthesize-cohort", **STUDY_TASK)
def synthesize(checkpoint: FileRef, masks: FileRef, out_dir: str, count: int, sampler: str, steps: int,
               seed: int, cohort_id: str, device: str = "auto") -> FileRef:
    from synth.synthesize import synthesize_cohort

    with _Timer() as t:
        # masks.p holds either real rows (their labels) or edited masks (source=mask); ids prefixed with the
        # cohort id stay unique when cohorts are merged into one manifest
        out = synthesize_cohort(checkpoint.p, masks.p, out_dir, count=count, sampler=sampler, steps=steps, seed=seed,
                                cohort_name=cohort_id, case_prefix=f"{cohort_id}_", device=device)
    return ref(out, t.seconds)


# ---------------------------------------------------------------------------------------------------------------
# segment + eval

@task(name="train-segmenter", **STUDY_TASK)
def train_segmenter(manifest: FileRef, case_ids: list[str], out_dir: str, config: dict) -> FileRef:
    from segment.api import train

    with _Timer() as t:
        model_dir = train(manifest.p, case_ids, out_dir, config)
    return ref(model_dir, t.seconds)


@task(name="predict", **STUDY_TASK)
def predict(model: FileRef, manifest: FileRef, case_ids: list[str], out_dir: str) -> FileRef:
    """Predict and write predictions.json ({case_id: file name}) so that the result is one hashable file."""
    from segment.api import predict as _predict

    with _Timer() as t:
        preds = _predict(model.p, manifest.p, case_ids, out_dir)
        index = {cid: Path(p).resolve().relative_to(Path(out_dir).resolve()).as_posix() for cid, p in preds.items()}
        from .refs import hash_path

        listing = {cid: {"file": f, "sha256": hash_path(Path(out_dir) / f)} for cid, f in sorted(index.items())}
        target = Path(out_dir) / "predictions.json"
        atomic_write_text(target, json.dumps(listing, indent=1, sort_keys=True) + "\n")
    return ref(target, t.seconds)


def read_predictions(predictions: FileRef) -> dict[str, Path]:
    listing = json.loads(predictions.p.read_text())
    return {cid: predictions.p.parent / v["file"] for cid, v in listing.items()}


@task(name="evaluate", **STUDY_TASK)
def evaluate(predictions: FileRef, manifest: FileRef, run: dict, out_csv: str) -> FileRef:
    """Dice/HD95 per case and region, with the run's columns (run, mix, n_real, ... test_set) in front."""
    from eval.segmentation import evaluate_predictions

    with _Timer() as t:
        scores = evaluate_predictions(read_predictions(predictions), manifest.p)
        for i, (k, v) in enumerate(run.items()):
            scores.insert(i, k, v)
        atomic_write_text(out_csv, scores.to_csv(index=False))
    return ref(out_csv, t.seconds)


@task(name="collect-results", **STUDY_TASK)
def collect(study_dir: str, results: list[FileRef]) -> FileRef:
    """STUDY/results/per_case.csv from every run's scores (eval.results.write_results checks the columns)."""
    from eval.results import write_results

    with _Timer() as t:
        df = pd.concat([pd.read_csv(r.p) for r in results], ignore_index=True)
        out = write_results(study_dir, per_case=df, append=False)["per_case"]
    return ref(out, t.seconds)


@task(name="evaluate-synthesis", **STUDY_TASK)
def evaluate_synthesis(study_dir: str, real: FileRef, train_ids: list[str] | None, pools: list[FileRef],
                       predictions: dict[str, FileRef], judge: FileRef | None) -> FileRef:
    """results/synthesis.csv and results/memorisation.csv (eval.results.evaluate_synthesis). ``real``: the real
    cohort; ``train_ids``: the real cases Med-DDPM trained on (None: every real training case); ``pools`` only key
    the cache. ``predictions``: the real-only segmenter's predictions on each synthetic pool (semantic
    consistency); ``judge``: its model folder, whose encoder also gives the features of the Fréchet distance."""
    import functools

    from eval.results import evaluate_synthesis as _evaluate

    with _Timer() as t:
        kw = {}
        if judge is not None:
            from segment.monai_backend import encoder_features, load_model

            model, cfg = load_model(judge.p)
            kw = dict(feature_fn=functools.partial(encoder_features, (model, cfg)),
                      feature_extractor=f"{type(model).__name__} bottleneck of the real-only segmenter "
                                        f"{judge.p.name} (trained in this study)",
                      segmenter=f"real-only segmenter {judge.p.name}")
        written = _evaluate(study_dir, real_manifest=real.p, train_ids=train_ids,
                            predictions={k: read_predictions(v) for k, v in predictions.items()}, **kw)
    return ref(written["synthesis"], t.seconds)


@task(name="build-report", **STUDY_TASK)
def build_report(study_dir: str, inputs: list[FileRef]) -> FileRef:
    """eval.report builds the report from the study folder; ``inputs`` (per_case.csv, study.json, ...) only key
    the cache, so an unchanged study is not re-reported."""
    from eval.report import build_report as _build

    with _Timer() as t:
        folder = _build(study_dir)
    return ref(folder, t.seconds)

"""regenerate-cohort: a fresh, versioned synthetic cohort from a study's current Med-DDPM checkpoint.

Each run synthesises with new seeds (derived from the new version number, so a crashed run that is started
again resumes the same version instead of starting another), passes synth's quality gate, registers the result
as ``regen-vNNN`` in STUDY/synthetic/registry.json and STUDY/synthetic/data_manifest.csv, and keeps earlier
cohorts. ``keep`` prunes the oldest regenerated cohorts beyond that number, never one that a study used.

A distilled student (synth.distill; e.g. the checkpoint of a study run with sampler "distilled") is sampled as its
card says: sampler "distilled" at the student's own steps, also when sampler and steps are left at synth's defaults
(the card's own sampler); another sampler named for a student, or sampler "distilled" for a generator that is no
student, is refused naming the file before any work (``sampling_for``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from core.errors import InputError
from core.lock import folder_lock
from eval.records import STUDY_JSON, StudyRecord

from flows import registry, tasks  # absolute: see flows/study.py
from flows.plan import distilled_steps, refuse_student_with_another_sampler, student_steps
from flows.refs import ref
from flows.tasks import run_cached
from synth import defaults
from synth.schedulers import DISTILLED

SEED_BASE = 10_000  # regenerated cohort vN samples with seed SEED_BASE + N (study pools use small seeds)


def current_checkpoint(study: Path) -> Path:
    """The checkpoint the study's last finished augment-study used (study.json)."""
    record, sj = StudyRecord.read(study), study / STUDY_JSON
    if record is None:
        raise InputError(sj, "no study.json: run augment-study in this folder first, or pass checkpoint=",
                          kind="missing-file")
    if record.checkpoint is None:
        raise InputError(sj, "the study trained no Med-DDPM checkpoint (no synthetic mix); pass checkpoint=",
                          kind="missing-file")
    return Path(record.checkpoint.path)


def default_masks(study: Path) -> Path:
    """Edited masks of the study if it made any (new conditions), else its real training cases' masks."""
    edited = study / "masks" / "data_manifest.csv"
    if edited.exists():
        return edited
    record = StudyRecord.read(study)
    selected = record.study_path(study, record.cohort.selected_manifest) if record else None
    if selected:
        return selected
    raise InputError(study / STUDY_JSON, "no conditioning masks found in the study; pass masks=", kind="missing-file")


@flow(name="regenerate-cohort", log_prints=True)
def regenerate_cohort(
    study_dir: str = "runs/default-study",
    count: int | None = None,
    checkpoint: str | None = None,
    masks: str | None = None,
    sampler: str = defaults.SAMPLER,
    steps: int = defaults.STEPS,
    seed: int | None = None,
    keep: int | None = None,
    max_gate_failures: int = 0,
    device: str = "auto",
    wait: float | None = 0,
) -> dict[str, Any]:
    """Synthesise, gate and register cohort regen-vNNN. count: cases (default: one per mask). keep: retention
    (the newest ``keep`` regenerated cohorts stay, plus any a study used; None keeps all). max_gate_failures:
    cases still failing synth's quality gate after its redraws that are tolerated (default 0). wait: if another run
    owns the study folder (core.lock), seconds to wait for it (None: as long as it takes; 0: stop at once)."""
    with folder_lock(study_dir, wait, what="regenerate-cohort flow"):  # the CLI's lock, taken again in-process
        return _regenerate(study_dir, count, checkpoint, masks, sampler, steps, seed, keep, max_gate_failures, device)


def _regenerate(study_dir: str, count: int | None, checkpoint: str | None, masks: str | None, sampler: str,
                steps: int, seed: int | None, keep: int | None, max_gate_failures: int, device: str) -> dict[str, Any]:
    logger = get_run_logger()
    study = Path(study_dir).resolve()
    ck_path = checkpoint or current_checkpoint(study)
    sampler, steps = sampling_for(ck_path, sampler, int(steps))  # before any work: a student samples as its card says
    if sampler == DISTILLED:
        logger.info(f"{ck_path}: a {steps}-step distilled student, sampled with {DISTILLED}-{steps}")
    ck = ref(ck_path)
    mask_ref = ref(masks or default_masks(study))
    if count is None:
        from cohort.manifest import load_manifest

        count = len(load_manifest(mask_ref.path))
    cohort_id = registry.next_version(study)
    version = int(cohort_id.rsplit("-v", 1)[1])
    seed = SEED_BASE + version if seed is None else int(seed)
    out_dir = study / "synthetic" / cohort_id
    synthetic = run_cached(tasks.synthesize, study, ck, mask_ref, str(out_dir), int(count), sampler, int(steps), seed,
                           cohort_id, device)
    gate = quality_gate(Path(synthetic.path), int(count), int(max_gate_failures))
    registry.register(study, cohort_id, synthetic.path, synthetic.sha256, kind="regenerated",
                      checkpoint_sha256=ck.sha256, masks_sha256=mask_ref.sha256, sampler=sampler, steps=int(steps),
                      seed=seed, count=int(count), gate=gate)
    pruned = registry.prune(study, keep)
    merged = registry.rebuild_manifest(study)
    logger.info(f"registered {cohort_id} ({count} cases, seed {seed}); pruned {pruned or 'nothing'}")
    publish_registry(study)
    return {"cohort_id": cohort_id, "manifest": synthetic.path, "seed": seed, "pruned": pruned,
            "registry_manifest": str(merged) if merged else None}


def sampling_for(checkpoint: str | Path, sampler: str, steps: int) -> tuple[str, int]:
    """(sampler, steps) that regenerate-cohort samples ``checkpoint`` with. sampler "distilled": the student's own
    steps (flows.plan.distilled_steps: a file that is no student is synth's InputError naming it). A student with
    sampler and steps left at synth's defaults: its card's sampler ("distilled", its steps), so the nightly
    deployment of a study that ran on a student keeps sampling it as it was made to be sampled. A student with
    another sampler named: ConfigError naming the file. Any other generator: as given."""
    if sampler == DISTILLED:
        return sampler, distilled_steps(checkpoint, steps, setting="steps")
    own = student_steps(checkpoint)
    if own is None:
        return sampler, steps
    if (sampler, steps) == (defaults.SAMPLER, defaults.STEPS):
        return DISTILLED, own
    refuse_student_with_another_sampler(checkpoint, sampler)  # raises: a student with another sampler
    return sampler, steps


def quality_gate(manifest: Path, count: int, max_failures: int) -> dict:
    """synth.synthesize gates every sample (per-label median intensity inside the training range, failures redrawn
    with new seeds) and marks what still fails; here a cohort with more than ``max_failures`` such cases, or
    fewer cases than asked, is refused (not registered)."""
    from cohort.manifest import load_manifest, select

    df = select(load_manifest(manifest), source="synthetic")
    failed = int((df["quality_gate"] == "fail").sum()) if "quality_gate" in df.columns else 0
    gate = {"cases": int(len(df)), "passed": int(len(df) - failed), "failed": failed,
            "report": "quality_report.csv"}
    if len(df) < count:
        raise InputError(manifest, f"only {len(df)} of {count} synthetic cases were written", kind="quality-gate")
    if failed > max_failures:
        raise InputError(manifest, f"quality gate: {failed} of {len(df)} cases failed (allowed {max_failures}); "
                                    f"see {manifest.parent / 'quality_report.csv'}; cohort not registered",
                          kind="quality-gate")
    return gate


def publish_registry(study: Path) -> None:
    from prefect.artifacts import create_table_artifact

    reg = registry.read_registry(study)
    rows = [{"id": c["id"], "kind": c["kind"], "created": c["created"], "seed": c.get("seed"),
             "used_by": ", ".join(c["used_by"]), "manifest": c["manifest"]} for c in reg["cohorts"]]
    create_table_artifact(key="synthetic-cohorts", table=rows, description=f"synthetic cohorts of {study}")

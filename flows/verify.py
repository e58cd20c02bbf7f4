"""`medddpm verify STUDY`: check a whole study folder against the hashes recorded when its files were written, and
list what is damaged or missing (rc 1 if anything is).

It lives in flows/ because it knows the study folder's layout, which flows/ writes, and reads what every package
records (cohort manifests, synth's training record, segment's model folders, eval's study.json, the cached task
results under STUDY/.prefect/results); it imports no Prefect (flows/__init__ does not either), so it runs in a
second without starting a Prefect API. Checks:

- every manifest (data_manifest*.csv): cohort.manifest's schema checks and every file's sha256
  (cohort.manifest.damaged_files); an undamaged one is also validated file by file (cohort.manifest.validate_manifest:
  readable 3-D NIfTI, one grid per case, labels in the convention);
- every Med-DDPM training folder: the generator, the resumable state and the intensity ranges against the training
  record (synth.train.training_damage);
- study.json (eval.records.StudyRecord): the hash of each stage it records (cohort, checkpoint, pools, merged
  manifest, per_case.csv, synthesis.csv, masks), every segmenter run's model folder complete (segment.api.is_trained),
  the report's inputs (per_case.csv, study.json) and the report itself present;
- every result the study's cached tasks returned (FileRefs: segmenter model folders, predictions, per-run scores,
  the report): the file or folder still has the content of one of them, and a predictions index's files theirs.
"""
from __future__ import annotations

import base64
import json
import pickle
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError, MedDDPMError

from .refs import FileRef, damaged_refs, hash_path, listed_damage

RESULTS = Path(".prefect") / "results"


@dataclass(frozen=True)
class Finding:
    path: Path
    problem: str
    kind: str  # "damaged" | "missing" | "invalid" | "unverifiable" (a note: nothing recorded to check against)

    def line(self) -> str:
        return f"{self.kind.upper():<12} {self.path}: {self.problem}"


@dataclass
class Verification:
    findings: list[Finding]
    checked: dict[str, int]  # what was checked: manifests, files, training folders, stages, cached results

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.kind != "unverifiable"]


def verify_study(study_dir: str | Path) -> Verification:
    study = Path(study_dir).resolve()
    if not study.is_dir():
        raise InputError(study, "study folder does not exist", kind="missing-file")
    findings: list[Finding] = []
    checked = {"manifests": 0, "case files": 0, "training folders": 0, "study.json stages": 0, "cached results": 0}
    _manifests(study, findings, checked)
    _trainings(study, findings, checked)
    _study_record(study, findings, checked)
    _cached_results(study, findings, checked)
    seen, unique = set(), []
    for f in findings:  # one line per file, the first (most specific) problem found
        if f.path not in seen:
            seen.add(f.path)
            unique.append(f)
    return Verification(unique, checked)


def _inside(study: Path, p: Path) -> bool:
    return RESULTS.parts[0] not in p.relative_to(study).parts


def _manifests(study: Path, findings: list[Finding], checked: dict) -> None:
    from cohort.manifest import check_rows, damaged_files, load_manifest, validate_manifest

    for m in sorted(p for p in study.rglob("data_manifest*.csv") if _inside(study, p)):
        checked["manifests"] += 1
        try:
            df = load_manifest(m)
            check_rows(df, m)
            damage = damaged_files(m, df)
        except MedDDPMError as e:
            findings.append(Finding(m, getattr(e, "problem", str(e)), "invalid"))
            continue
        checked["case files"] += int(df[[c for c in df.columns if c.startswith("sha256_")]].notna().sum().sum())
        for cid, f, problem in damage:
            findings.append(Finding(f, f"{problem} (case {cid} of {m})", "missing" if problem == "missing" else
                                    "damaged"))
        if not damage:
            try:
                validate_manifest(m, check_files=True, check_hashes=False)
            except InputError as e:
                findings.append(Finding(Path(e.path or m), f"{e.problem} (named in {m})", "invalid"))


def _trainings(study: Path, findings: list[Finding], checked: dict) -> None:
    from synth.checkpoint import GENERATOR_FILE, STATE_FILE
    from synth.train import RECORD_FILE, read_training_record, training_damage

    for gen in sorted(p for p in study.rglob(GENERATOR_FILE) if _inside(study, p)):
        out = gen.parent
        if not (out / STATE_FILE).exists():
            continue  # an imported or given generator: no training here
        checked["training folders"] += 1
        if read_training_record(out) is None:
            findings.append(Finding(out / RECORD_FILE, "no training record (trained before records existed): the "
                                    "generator and state cannot be checked (a `medddpm train` resume on this "
                                    "folder writes it)", "unverifiable"))
        for path, problem in training_damage(out):
            findings.append(Finding(path, problem, "damaged"))


def _check_hash(study: Path, path: Path | None, sha256: str | None, what: str, findings: list[Finding],
                checked: dict) -> None:
    if path is None or not sha256:
        return
    checked["study.json stages"] += 1
    try:
        got = hash_path(path)
    except FileNotFoundError:
        findings.append(Finding(path, f"missing ({what} recorded in study.json)", "missing"))
        return
    if got != sha256:
        findings.append(Finding(path, f"sha256 differs from study.json's ({what})", "damaged"))


def _relocated(study: Path, recorded: str | None, old_root: str | None = None) -> Path | None:
    """A path recorded by this study, in this folder: relative ones below it; absolute ones below the folder the
    study was made in (a copied or moved study) mapped into this one."""
    if not recorded:
        return None
    p = Path(recorded)
    if not p.is_absolute():
        return study / p
    if old_root and p.is_relative_to(old_root):
        return study / p.relative_to(old_root)
    return p


def _study_record(study: Path, findings: list[Finding], checked: dict) -> None:
    from eval.records import STUDY_JSON, StudyRecord
    from segment.api import is_trained

    try:
        record = StudyRecord.read(study)
    except InputError as e:
        findings.append(Finding(study / STUDY_JSON, e.problem, "invalid"))
        return
    if record is None:
        findings.append(Finding(study / STUDY_JSON, "missing: the study has not finished (rerun `medddpm study "
                                                    f"--out {study}` to finish it)", "missing"))
        return
    # where the study was made: its absolute paths are mapped into this folder (a copied or moved study)
    made_in = [str(Path(r.model_dir).parent.parent) for r in record.runs if Path(r.model_dir).is_absolute()]
    old_root = made_in[0] if made_in else str(study)
    h = record.hashes
    _check_hash(study, _relocated(study, record.cohort.manifest, old_root), record.cohort.sha256, "the cohort",
                findings, checked)
    if record.checkpoint:
        _check_hash(study, _relocated(study, record.checkpoint.path, old_root), record.checkpoint.sha256,
                    "the Med-DDPM generator", findings, checked)
    for name, pool in record.synthetic.items():
        _check_hash(study, _relocated(study, pool.manifest, old_root), pool.sha256, f"synthetic pool {name}",
                    findings, checked)
    for stage, rel in (("merge", "data_manifest.csv"), ("collect", "results/per_case.csv"),
                       ("synthesis-quality", "results/synthesis.csv"), ("edit-masks", "masks/data_manifest.csv")):
        _check_hash(study, study / rel, h.get(stage), f"stage {stage}", findings, checked)
    for run in record.runs:
        model = _relocated(study, run.model_dir, old_root)
        if model is not None and not model.exists():
            model = study / "segmenters" / run.run  # made elsewhere, copied here
        if not is_trained(model):
            findings.append(Finding(model, f"segmenter of run {run.run} is missing or incomplete", "missing"))
    for rel in ("report/report.md", "results/per_case.csv"):
        if not (study / rel).exists():
            findings.append(Finding(study / rel, "missing (the report and its inputs)", "missing"))


def _cached_results(study: Path, findings: list[Finding], checked: dict) -> None:
    """Every FileRef a cached task returned: its file or folder (mapped into this folder) must have the content of
    at least one cached result for that path (older results of a rebuilt stage stay in the cache)."""
    results = study / RESULTS
    if not results.is_dir():
        return
    wanted: dict[Path, set[str]] = {}
    for f in sorted(results.iterdir()):
        try:
            doc = json.loads(f.read_text())
            value = pickle.loads(base64.b64decode(doc["result"]))
            old_root = str(Path(doc["metadata"]["storage_key"]).parent.parent.parent)
        except Exception:  # not a result file, or a result of something else: nothing to check
            continue
        for r in _refs(value):
            p = _relocated(study, r.path, old_root)
            if p is not None and p.exists() and (p == study or study in p.parents):
                wanted.setdefault(p, set()).add(r.sha256)
    for p, hashes in sorted(wanted.items()):
        checked["cached results"] += 1
        if hash_path(p) not in hashes:
            findings.append(Finding(p, "changed since the task that made it (its content matches none of the "
                                       "cached results for it)", "damaged"))
        for f, problem in listed_damage(p):
            findings.append(Finding(f, problem, "missing" if problem.startswith("missing") else "damaged"))


def _refs(value) -> list[FileRef]:
    if isinstance(value, FileRef):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [r for v in items for r in _refs(v)]


# ---------------------------------------------------------------------------------------------------------------
# the verb

def register(subparsers) -> None:
    p = subparsers.add_parser(
        "verify", help="check a study folder against its recorded hashes; list what is damaged or missing",
        description="Check every manifest (schema, every file's sha256, readable NIfTI), every Med-DDPM training "
                    "folder against its training record, study.json's stage hashes, the segmenters, the report's "
                    "inputs and every cached task result. Prints one line per damaged or missing file; exit "
                    "status 1 if there is one. A rerun of `medddpm study --out STUDY` rebuilds what it can.")
    p.add_argument("study", help="study folder")
    p.set_defaults(func=_verify)


def _verify(args) -> int:
    result = verify_study(args.study)
    for f in result.findings:
        print(f.line())
    summary = ", ".join(f"{n} {what}" for what, n in result.checked.items())
    if result.problems:
        print(f"{len(result.problems)} damaged, missing or invalid (checked {summary}); rerun `medddpm study --out "
              f"{args.study}` to rebuild what can be rebuilt, it names what cannot")
        return 1
    print(f"intact: checked {summary}")
    return 0


__all__ = ["Finding", "Verification", "damaged_refs", "verify_study"]

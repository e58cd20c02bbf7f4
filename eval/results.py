"""The study's results files: their schema, the writer, the readers, and the synthesis/memorisation tables.

Files (paths relative to STUDY; docs/eval.md "Report inputs" has the full column lists):
- results/per_case.csv     PER_CASE_COLUMNS: run, mix, n_real, n_synth, backend, seed, test_set, case_id, region,
                           dice, hd95 (one row per run x test case x region; hd95 in mm). Written by the flow.
- results/synthesis.csv    eval.synthesis.SYNTHESIS_COLUMNS   } both written by ``evaluate_synthesis``
- results/memorisation.csv eval.memorisation.MEMORISATION_COLUMNS }
Every write goes through ``write_results`` (columns checked, atomic, append replaces rows with the same key).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from core.errors import InputError
from core.fsutil import atomic_path

from .memorisation import MEMORISATION_COLUMNS
from .records import StudyRecord
from .synthesis import SYNTHESIS_COLUMNS

PER_CASE_COLUMNS = ("run", "mix", "n_real", "n_synth", "backend", "seed", "test_set", "case_id", "region", "dice",
                    "hd95")
RESULT_FILES = {"per_case": ("per_case.csv", PER_CASE_COLUMNS), "synthesis": ("synthesis.csv", SYNTHESIS_COLUMNS),
                "memorisation": ("memorisation.csv", MEMORISATION_COLUMNS)}
# the keys that identify a row in each results file (append replaces rows with the same key)
RESULT_KEYS = {"per_case": ("run", "test_set", "case_id", "region"),
               "synthesis": ("synthetic_id", "metric", "region"),
               "memorisation": ("synthetic_id", "kind", "case_id")}

def write_results(study_dir: str | Path, *, per_case: pd.DataFrame | None = None,
                  synthesis: pd.DataFrame | None = None, memorisation: pd.DataFrame | None = None,
                  append: bool = True) -> dict[str, Path]:
    """Write the report's inputs to STUDY/results/ atomically, checking their columns.

    append=True merges with an existing file, new rows replacing old ones with the same key (RESULT_KEYS), so
    a resumed flow can write run by run. Returns {name: path} of the files written.
    """
    out = {}
    for name, df in (("per_case", per_case), ("synthesis", synthesis), ("memorisation", memorisation)):
        if df is None:
            continue
        fname, cols = RESULT_FILES[name]
        path = Path(study_dir) / "results" / fname
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise InputError(path, f"{name} table lacks columns {missing} (needs {list(cols)})", kind="bad-results")
        df = df[list(cols)]
        if append and path.exists():
            old = pd.read_csv(path)
            df = pd.concat([old, df], ignore_index=True)
            keys = [k for k in RESULT_KEYS[name] if k in df.columns]
            ident = df[keys].apply(lambda c: c.map(lambda v: "" if pd.isna(v) else str(v)))
            df = df[~ident.duplicated(keep="last")]
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
        out[name] = path
    return out



def evaluate_synthesis(study_dir: str | Path, *, real_manifest: str | Path, train_ids: list[str] | None,
                       predictions: Mapping[str, Mapping[str, str | Path]] | None = None,
                       segmenter: str = "real-only segmenter",
                       feature_fn: Callable | None = None, feature_extractor: str | None = None,
                       max_pairs: int | None = 100, seed: int = 0, rule: str = "max") -> dict[str, Path]:
    """Compute results/synthesis.csv and results/memorisation.csv for every STUDY/synthetic/<id>/ cohort.

    real_manifest: the real cohort. train_ids: the real cases Med-DDPM trained on (None: every real training
    case; a study's record gives them: ``StudyRecord.generator_train_ids``). predictions: {synthetic_id:
    {case_id: predicted label path}} of a real-only segmenter on that cohort (semantic consistency; skipped for
    ids without predictions). feature_fn / feature_extractor: see eval.synthesis.synthesis_table.
    """
    from .memorisation import memorisation_table
    from .synthesis import synthesis_table

    study = Path(study_dir)
    real = Path(real_manifest)
    masks = study / "masks" / "data_manifest.csv"
    syn_frames, mem_frames = [], []
    for sid, man in synthetic_manifests(study).items():
        syn_frames.append(synthesis_table(real, man, synthetic_id=sid, real_case_ids=train_ids,
                                          predictions=(predictions or {}).get(sid), segmenter=segmenter,
                                          feature_fn=feature_fn, feature_extractor=feature_extractor,
                                          max_pairs=max_pairs, seed=seed))
        mem_frames.append(memorisation_table(real, man, synthetic_id=sid, train_ids=train_ids,
                                             masks_manifest=masks if masks.exists() else None, rule=rule))
    if not syn_frames:
        raise InputError(study / "synthetic", "no synthetic/<id>/data_manifest.csv in the study", kind="missing-file")
    return write_results(study, synthesis=pd.concat(syn_frames, ignore_index=True),
                         memorisation=pd.concat(mem_frames, ignore_index=True))


def read_results(study_dir: str | Path, name: str, required: bool = False) -> pd.DataFrame | None:
    """One results file (``name`` in RESULT_FILES) with its columns checked; None if absent and not required."""
    fname, columns = RESULT_FILES[name]
    path = Path(study_dir) / "results" / fname
    if not path.exists():
        if required:
            raise InputError(path, "missing (the study's flow writes it; see docs/eval.md)", kind="missing-file")
        return None
    df = pd.read_csv(path, keep_default_na=True)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise InputError(path, f"lacks columns {missing}", kind="bad-results")
    return df


def real_manifest(study_dir: str | Path) -> Path:
    """The study's real cohort manifest: the one its record names, else STUDY/cohort/data_manifest.csv."""
    study = Path(study_dir)
    record = StudyRecord.read(study)
    recorded = record.study_path(study, record.cohort.manifest) if record else None
    cand = [recorded] if recorded else []
    cand.append(study / "cohort" / "data_manifest.csv")
    for c in cand:
        if c.exists():
            return c
    raise InputError(cand[-1], "the study's real cohort manifest is missing", kind="missing-file")


def synthetic_manifests(study_dir: str | Path) -> dict[str, Path]:
    """{synthetic cohort id: manifest} of every STUDY/synthetic/<id>/data_manifest.csv."""
    return {p.parent.name: p for p in sorted((Path(study_dir) / "synthetic").glob("*/data_manifest.csv"))}

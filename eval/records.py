"""STUDY/study.json as one typed record: written by flows/ (augment-study), read by eval.report and
flows.regenerate. It lives in eval/ because eval must not import flows (flows imports eval).

Every top-level field has a default, so a partial study.json (an older study, a hand-made one) still reads;
an entry that is present must be complete (a run needs its name, a pool its manifest). Unknown keys are kept
(``extra="allow"``) and shown by the report.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.errors import InputError
from core.fsutil import atomic_write_text

STUDY_JSON = "study.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="allow")


class CohortRecord(_Record):
    """The real cohort of the study and the training cases drawn from it."""

    manifest: str | None = None  # relative to the study folder when inside it
    sha256: str | None = None
    n_real_train: int | None = None
    train_case_ids: list[str] = []  # the n_real selected real training cases (every mix uses them)
    selected_manifest: str | None = None  # manifest of those cases
    n_test: int | None = None


class CheckpointRecord(_Record):
    path: str
    sha256: str


class PoolRecord(_Record):
    """One synthetic pool of the study (STUDY/synthetic/study-<name>-masks/)."""

    manifest: str
    sha256: str
    n: int
    gate_failed: int  # cases still failing synth's quality gate
    gate_failures: str  # the study's policy for them: fill | exclude | keep


class RunRecord(_Record):
    """One segmenter run: (mix, back end, seed)."""

    run: str
    config: dict[str, Any] = {}
    model_dir: str = ""
    gate_failed_cases: int = 0
    columns: dict[str, Any] = {}  # run, mix, n_real, n_synth, backend, seed (the per_case.csv columns)
    n_cases: int = 0


class TestSetRecord(_Record):
    name: str
    manifest: str = ""
    n: int = 0


class StudyRecord(_Record):
    study: str | None = None  # "augment-study:<hash of the parameters>"
    parameters: dict[str, Any] = {}  # the flow parameters, exactly
    cohort: CohortRecord = Field(default_factory=CohortRecord)
    hashes: dict[str, str] = {}  # sha256 of each stage's output
    checkpoint: CheckpointRecord | None = None  # the Med-DDPM checkpoint (None: no synthetic mix)
    synthetic: dict[str, PoolRecord] = {}
    runs: list[RunRecord] = []
    test_sets: list[TestSetRecord] = []  # test_sets[0] is the primary test set
    wall_seconds: dict[str, float] = {}
    versions: dict[str, str] = {}

    @classmethod
    def read(cls, study_dir: str | Path) -> "StudyRecord | None":
        """The study's record, or None if it has no study.json. InputError names the file if it is unreadable."""
        path = Path(study_dir) / STUDY_JSON
        if not path.exists():
            return None
        try:
            return cls.model_validate_json(path.read_text())
        except ValidationError as e:
            raise InputError(path, f"not a valid study record ({e.error_count()} problems: "
                                    f"{e.errors()[0]['loc']}: {e.errors()[0]['msg']})", kind="unreadable") from e

    def to_json(self) -> str:
        """The file's text: sorted keys, so an unchanged study writes the same bytes."""
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True, default=str) + "\n"

    def write(self, study_dir: str | Path) -> Path:
        """Write study.json only if its content changes, so an unchanged study keeps its hash (and a report task
        keyed on it stays cached)."""
        path = Path(study_dir) / STUDY_JSON
        text = self.to_json()
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)
        return path

    def as_written(self) -> dict[str, Any]:
        """The fields present in the file (or set by the writer), as JSON values."""
        return self.model_dump(mode="json", exclude_unset=True)

    def study_path(self, study_dir: str | Path, rel: str | None) -> Path | None:
        """A path recorded relative to the study folder (absolute ones unchanged)."""
        if not rel:
            return None
        return Path(rel) if Path(rel).is_absolute() else Path(study_dir) / rel

    def generator_train_ids(self) -> list[str] | None:
        """The real cases Med-DDPM trained on: the selected cases (medddpm_on="selected", the default), or None
        for every real training case of the cohort (medddpm_on="all")."""
        if self.parameters.get("medddpm_on", "selected") == "selected":
            return list(self.cohort.train_case_ids) or None
        return None

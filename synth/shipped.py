"""Generators shipped with the project, to fine-tune instead of training from scratch (``--init-from``).

Two cores cannot train a Med-DDPM whose samples show anatomy within the demo study's few minutes. Users of the
paper profiles start from the authors' published weights (``medddpm import-weights``); the demo study does the
same with a small generator pre-trained once on a larger phantom cohort. The phantom cases it saw are drawn with
another seed (PRETRAIN_COHORT) than the study's cohort, so none of them is a study case: the study's test cases
stay unseen. Each shipped file has a JSON card beside it with the exact commands, the training cases' hash and
the measured time (the card is what ``shipped_generator`` checks).
"""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import InputError, ConfigError
from core.fsutil import sha256_file

SHIPPED_DIR = Path(__file__).resolve().parent / "pretrained"
# cohort profile -> file name of its shipped generator (its card: the same name with .json). v4 is v3 pre-trained
# 12 000 steps further (lr 1e-3 cosine to 1e-5); v3 is v2 pre-trained further with the L2 loss and the Min-SNR
# weight floored at 1; v2 is v1 pre-trained further with Min-SNR-5 (v1-v3, the chain's starting points, are kept
# outside the installed package: scripts/demo_generator_chain/; docs/decisions/0008-shipped-demo-generator.md).
# Only these files are package data (pyproject.toml).
SHIPPED = {"demo": "demo-phantom-v4.safetensors"}
# cohort profile -> {steps: the distilled student of its shipped generator} (scripts/distill_demo_generator.py:
# progressive distillation, sampled with --sampler distilled at its own steps; docs/decisions/0019-distillation.md).
# A study with sampler "distilled" and no checkpoint uses one as is (flows.plan.StudyParams): the one its sampling
# steps name, else DEFAULT_STUDENT_STEPS's. Two ship because neither meets every target: the 2-step one is the faster,
# the 4-step one (the 2-step one's first round) the one whose gate and fidelity match DDIM-10's (benchmarks.md#distill).
SHIPPED_STUDENTS = {"demo": {2: "demo-phantom-v4-distilled-2.safetensors",
                             4: "demo-phantom-v4-distilled-4.safetensors"}}
DEFAULT_STUDENT_STEPS = 2
# the phantom cohort the demo generator was pre-trained on: not the study's (cohort seed 0)
PRETRAIN_COHORT = dict(n_cases=160, seed=1000, profile="demo")
# fine-tuning on a study's cases: short, low learning rate, EMA from the start (the pre-trained weights are
# already good; a high rate would undo them on 8 cases)
FINE_TUNE = {"demo": dict(steps=300, lr=2e-4, lr_schedule="cosine", lr_min=2e-5, warmup_steps=0, ema_decay=0.99,
                          ema_start=0, checkpoint_every=100)}


def shipped_generator(profile: str) -> Path | None:
    """The shipped generator of a cohort profile (None if the project ships none), checked against its card."""
    name = SHIPPED.get(profile)
    return None if name is None else checked_shipped_file(SHIPPED_DIR / name)


def shipped_student_path(profile: str, steps: int = DEFAULT_STUDENT_STEPS) -> Path | None:
    """Where the shipped ``steps``-step distilled student of a profile lies (None if the profile ships no student);
    plain data, no disk read: the study's parameters name it, ``checked_shipped_file`` checks it before use. A step
    count the profile ships no student of is a ConfigError listing those it ships."""
    students = SHIPPED_STUDENTS.get(profile)
    if students is None:
        return None
    if steps not in students:
        raise ConfigError(f"profile {profile!r} ships distilled students of {', '.join(map(str, sorted(students)))} "
                          f"steps, not {steps} (make another with `medddpm distill --steps {steps}`, then pass it "
                          "as the checkpoint)")
    return SHIPPED_DIR / students[steps]


def is_shipped_file(path: str | Path) -> bool:
    return Path(path).resolve().parent == SHIPPED_DIR.resolve()


def checked_shipped_file(path: Path) -> Path:
    """``path`` (a shipped generator or student), after checking it against the sha256 of its JSON card."""
    card = path.with_suffix(".json")
    if not path.exists() or not card.exists():
        raise InputError(path, f"the shipped generator or its card {card.name} is missing from this checkout",
                          kind="missing-file")
    want = json.loads(card.read_text())["sha256"]
    if sha256_file(path) != want:
        raise InputError(path, f"the shipped generator does not match the sha256 in its card {card.name}",
                          kind="bad-checkpoint")
    return path


def fine_tune_config(profile: str, init: str | Path) -> dict:
    """The Med-DDPM config overrides that fine-tune ``init`` on a study's cases."""
    if profile not in FINE_TUNE:
        raise ConfigError(f"no fine-tuning recipe for profile {profile!r}; known: {sorted(FINE_TUNE)}")
    return {**FINE_TUNE[profile], "init_from": str(init)}

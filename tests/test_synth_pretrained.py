"""The generator the project ships for the demo study (synth/shipped.py): intact, trained, and fine-tuned by the
study."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from core.errors import InputError, ConfigError
from core.fsutil import sha256_file
from flows.plan import StudyParams
from flows.study import generator_init
from synth import shipped

# the shipped student's MAE to its teacher's chain inside the tumour, at most this share of the teacher's own DDIM-2's
# (2026-12-06: the clamp-aware l1 student 0.46, the l1 student 0.46; the l2 student with tumour weight 20 before them
# 0.47; the unweighted one 0.66)
TUMOUR_GAP_RATIO = 0.6
# the shipped 2-step student's background median above the chain's, mean over 2 masks x 4 modalities: the clamp-aware
# l1 student -0.003 (max +0.006); the l1 student before it 0.014 and the l2 one 0.021 would fail
BACKGROUND_LIFT = 0.008


def test_the_shipped_demo_generator_matches_its_card():
    path = shipped.shipped_generator("demo")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["profile"] == "demo" and card["pretrain_cohort"] == shipped.PRETRAIN_COHORT
    assert card["pretrain_cohort"]["seed"] != StudyParams().cohort_seed  # not the study's cohort
    assert shipped.shipped_generator("tiny") is None  # nothing ships for the unit-test profile


def test_the_shipped_generators_config_reproduces_its_cards_config_hash():
    """The config in the generator's metadata, with the sha256 of the file its run started from (init_from),
    gives the config hash its card records: the hash is computed from the config alone, never from a file."""
    from safetensors import safe_open

    from synth.config import MedDDPMConfig

    path = shipped.shipped_generator("demo")
    card = json.loads(path.with_suffix(".json").read_text())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = MedDDPMConfig.from_dict(json.loads(meta["config"]))
    assert cfg.init_from and cfg.init_from_sha256 is None  # written before the config carried the sha256
    assert cfg.replace(init_from_sha256=card["starts_from"]["sha256"]).hash() == card["config_hash"]
    assert meta["config_hash"] == card["config_hash"] != cfg.hash()


def test_only_the_shipped_generators_and_their_cards_are_package_data():
    """pyproject.toml installs exactly the files SHIPPED and SHIPPED_STUDENTS name (with their cards) and their gate's
    ranges, so a new version ships by changing both together."""
    import tomllib
    from pathlib import Path

    from synth.checkpoint import RANGES_FILE

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    folder = shipped.SHIPPED_DIR.name
    files = [*shipped.SHIPPED.values(), *(name for students in shipped.SHIPPED_STUDENTS.values()
                                          for name in students.values())]
    assert len(files) == 3  # the demo generator and its 2- and 4-step students
    want = {f"{folder}/{name}" for gen in files for name in (gen, Path(gen).with_suffix(".json").name)}
    want.add(f"{folder}/{RANGES_FILE}")  # the quality gate's ranges of the shipped files (a student is used as is)
    assert set(data) == {"synth"} and set(data["synth"]) == want
    assert all((shipped.SHIPPED_DIR.parent / f).is_file() for f in want)


def test_a_changed_or_missing_shipped_file_is_refused(tmp_path, monkeypatch):
    src = shipped.SHIPPED_DIR / shipped.SHIPPED["demo"]
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    with pytest.raises(InputError, match="missing"):
        shipped.shipped_generator("demo")
    shutil.copyfile(src.with_suffix(".json"), tmp_path / src.with_suffix(".json").name)
    (tmp_path / src.name).write_bytes(src.read_bytes()[:-1] + b" ")
    with pytest.raises(InputError, match="sha256"):
        shipped.shipped_generator("demo")


def test_the_shipped_generator_denoises_phantom_cases_better_than_its_untrained_network(tmp_path):
    """The weights are trained: on two phantom cases of another seed than its pre-training cohort, its held-out
    denoising loss is well below that of the same network freshly initialised."""
    from cohort.phantom import build_phantom_cohort
    from synth.checkpoint import load_generator
    from synth.data import load_items, training_rows
    from synth.network import build_unet
    from synth.train import denoising_loss

    manifest = build_phantom_cohort(tmp_path / "c", n_cases=2, seed=7, profile="demo")
    model, cfg, _ = load_generator(shipped.shipped_generator("demo"))
    items = load_items(manifest, cfg, training_rows(manifest, cfg, splits=("train", "val", "test")))
    torch.manual_seed(0)
    untrained = build_unet(cfg)
    trained_loss = denoising_loss(model, items, cfg, n_draws=6)
    untrained_loss = denoising_loss(untrained, items, cfg, n_draws=6)
    assert trained_loss < 0.5 * untrained_loss, (trained_loss, untrained_loss)


def test_the_study_fine_tunes_the_shipped_generator_where_one_ships():
    init = generator_init(StudyParams(profile="demo"))
    assert init["init_from"] == str(shipped.shipped_generator("demo"))
    assert init["steps"] == shipped.FINE_TUNE["demo"]["steps"]
    assert generator_init(StudyParams(profile="demo", medddpm_init="scratch")) == {}
    assert generator_init(StudyParams(profile="tiny")) == {}  # none ships: from scratch
    with pytest.raises(ConfigError, match="fine-tuning recipe"):
        shipped.fine_tune_config("paper-brats", "x.safetensors")


@pytest.mark.parametrize("steps", [2, 4])
def test_each_shipped_demo_student_matches_its_card_and_names_the_shipped_generator_as_teacher(steps):
    from synth.distill import read_student_card

    path = shipped.checked_shipped_file(shipped.shipped_student_path("demo", steps))
    card = json.loads(path.with_suffix(".json").read_text())
    teacher_card = json.loads(shipped.shipped_generator("demo").with_suffix(".json").read_text())
    meta_card = read_student_card(path)  # the card in the file's metadata, which synthesis reads
    assert meta_card["teacher_sha256"] == card["teacher_sha256"] == teacher_card["sha256"]
    assert meta_card["student_steps"] == card["student_steps"] == steps and card["sampler"] == f"distilled-{steps}"
    assert sha256_file(shipped.SHIPPED_DIR / card["gate_ranges"]) == card["gate_ranges_sha256"]
    assert shipped.shipped_student_path("tiny") is None


def test_the_shipped_4_step_student_is_the_2_step_students_first_round():
    """The same recipe and seed (scripts/distill_demo_generator.py): the 4-step student's weights are those the
    2-step student's second round started from, so the two are one distillation stopped at two points. Checked
    through the cards: the same teacher, settings but the steps, and training cases."""
    cards = {n: json.loads(shipped.shipped_student_path("demo", n).with_suffix(".json").read_text()) for n in (2, 4)}
    for key in ("teacher_sha256", "training_cases_hash", "method", "teacher_steps"):
        assert cards[2][key] == cards[4][key], key
    settings = {n: {k: v for k, v in cards[n]["settings"].items() if k != "steps"} for n in (2, 4)}
    assert settings[2] == settings[4]


def test_a_study_with_sampler_distilled_and_no_checkpoint_uses_the_shipped_student(tmp_path, monkeypatch):
    from flows.plan import check_generator_choice

    params = StudyParams(profile="demo", sampler="distilled")
    assert params.medddpm_checkpoint == str(shipped.shipped_student_path("demo"))
    check_generator_choice(params)  # the shipped bytes match their card, and it is a student
    with pytest.raises(ConfigError, match="ships none"):
        StudyParams(profile="tiny", sampler="distilled")
    # --steps picks among the shipped students; the default 25 reads as the default student, a count none has is
    # refused with those that ship
    four = StudyParams(profile="demo", sampler="distilled", sampling_steps=4)
    assert four.medddpm_checkpoint == str(shipped.shipped_student_path("demo", 4)) != params.medddpm_checkpoint
    check_generator_choice(four)
    assert four.study_key != params.study_key
    assert StudyParams(profile="demo", sampler="distilled", sampling_steps=2).medddpm_checkpoint == \
        params.medddpm_checkpoint
    with pytest.raises(ConfigError, match="ships distilled students of 2, 4 steps, not 8"):
        StudyParams(profile="demo", sampler="distilled", sampling_steps=8)
    # a changed shipped student is refused before any work, naming the file
    src = shipped.shipped_student_path("demo")
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    shutil.copyfile(src.with_suffix(".json"), tmp_path / src.with_suffix(".json").name)
    (tmp_path / src.name).write_bytes(src.read_bytes()[:-1] + b" ")
    changed = StudyParams(profile="demo", sampler="distilled")
    assert changed.medddpm_checkpoint == str(tmp_path / src.name)
    with pytest.raises(InputError, match="sha256"):
        check_generator_choice(changed)


def test_the_shipped_student_reproduces_its_teachers_chain_better_than_the_teachers_own_few_steps(tmp_path):
    """The distillation taught it something where the segmenters learn from it: from the same noise on two phantom
    masks of another seed than its training cases, the student's 2 steps lie closer to the teacher's DDIM-8 (eta 0)
    chain, which it was distilled to reproduce, than the teacher's own DDIM-2 does, inside the tumour (NCR, ED, ET:
    ~1 % of the voxels, weighted by --tumour-weight) and in the rest of the brain. In the background (outside the
    brain), where the gate checks each modality's median, the student's medians lie less than 0.008 above the
    chain's on average (the students before it: 0.014 with --loss l1 alone, 0.021 with l2, and both failed the gate
    there; --clamp-aware counts no error where a prediction lies beyond the -1 the target sits on, so the sampler's
    clamp no longer keeps only the upward errors; benchmarks.md#distill)."""
    from cohort.labels import BACKGROUND, BRAIN, TUMOUR_LABELS
    from cohort.manifest import case_files, load_manifest
    from cohort.nifti import read_label
    from cohort.phantom import build_phantom_cohort
    from synth.checkpoint import load_generator
    from synth.distill import read_student_card
    from synth.network import condition_from_label
    from synth.schedulers import NoiseSchedule, distilled_sampler, make_sampler, sample

    path = shipped.shipped_student_path("demo")
    card = read_student_card(path)
    student, cfg, _ = load_generator(path)
    teacher, _, _ = load_generator(shipped.shipped_generator("demo"))
    manifest = build_phantom_cohort(tmp_path / "c", n_cases=2, seed=7, profile="demo")
    labels = [read_label(case_files(manifest, row).label)[0] for _, row in load_manifest(manifest).iterrows()]
    cond = torch.stack([condition_from_label(lab, cfg.condition) for lab in labels])
    run = lambda model, sampler, steps: sample(model, sampler, cond, cfg.out_channels, steps, [0, 1],  # noqa: E731
                                               prediction=cfg.prediction)
    ddim0 = make_sampler("ddim", cfg.timesteps, cfg.schedule, eta=0.0)
    chain = run(teacher, ddim0, card["teacher_steps"])
    own = run(student, distilled_sampler(2, NoiseSchedule.build(cfg.timesteps, cfg.schedule)), 2)
    plain = run(teacher, ddim0, 2)
    lab = torch.as_tensor(np.stack(labels)).unsqueeze(1).expand_as(chain)
    tumour, brain = torch.isin(lab, torch.tensor(TUMOUR_LABELS, dtype=lab.dtype)), lab == BRAIN
    gap = lambda x, where: float((x - chain).abs()[where].mean())  # noqa: E731
    assert gap(own, tumour) < TUMOUR_GAP_RATIO * gap(plain, tumour), (gap(own, tumour), gap(plain, tumour))
    assert gap(own, brain) < gap(plain, brain), (gap(own, brain), gap(plain, brain))
    outside = lab == BACKGROUND
    lift = [float(own[b, c][outside[b, c]].median() - chain[b, c][outside[b, c]].median())
            for b in range(own.shape[0]) for c in range(own.shape[1])]
    assert np.mean(lift) < BACKGROUND_LIFT, lift

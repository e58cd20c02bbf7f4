"""Distilled students (synth.distill) in the flows: the study and regenerate-cohort sample a student with its own
steps and record "distilled-N" in the manifests, the registry and the report; a generator that is no student with
sampler "distilled", a student with another sampler, or a student to fine-tune are refused naming the file before any
work; `medddpm plan --distill N` counts the hours of distilling (issue 33)."""
from __future__ import annotations

import json
import os
import re

import pytest

from core.errors import ConfigError, InputError
from tests.distill_helpers import tiny_teacher_and_student

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the machine is shared

SEG = {"epochs": 1, "iters_per_epoch": 1, "num_threads": 1}


@pytest.fixture(scope="module")
def generators(toy_cohort, tmp_path_factory):
    """(teacher, student): an untrained tiny generator (the tests check bookkeeping, not quality) and its 1-step
    student (tests/distill_helpers.py)."""
    return tiny_teacher_and_student(tmp_path_factory.mktemp("generators"), toy_cohort)


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    with prefect_test_harness(server_startup_timeout=300):
        yield


# ------------------------------------------------------------------------------- settings, before any work

def test_distilled_sampler_needs_a_student_checkpoint_and_the_study_key_of_old_settings_holds():
    from flows.plan import StudyParams

    with pytest.raises(ConfigError, match="pass it as medddpm_checkpoint.*medddpm distill --checkpoint STUDY/medddpm "
                                          "--manifest STUDY/cohort/train_n8_seed0.csv"):
        StudyParams(profile="tiny", sampler="distilled")  # the study's own generator is trained, never a student
    # (at the demo profile the shipped student is named instead: tests/test_synth_pretrained.py)
    # no new field: the keys published before distillation reached the flows are unchanged (values from HEAD 3c9943b)
    assert StudyParams().study_key == "augment-study:e8b15c23773e"
    assert StudyParams(profile="tiny", mixes=["0:1"], sampler="ddim", sampling_steps=10).study_key == \
        "augment-study:b43cb979c553"


def test_study_refuses_wrong_generator_choices_by_file_name(generators, tmp_path):
    from flows.plan import StudyParams
    from flows.plan import check_generator_choice, synthesis_steps

    teacher, student = generators
    base = dict(profile="tiny", mixes=["0:1"])
    with pytest.raises(InputError, match="not a distilled student") as e:
        check_generator_choice(StudyParams(**base, sampler="distilled", medddpm_checkpoint=str(teacher)))
    assert e.value.path == str(teacher)
    with pytest.raises(ConfigError, match=f"{re.escape(str(student))} is a 1-step distilled student.*'distilled'"):
        check_generator_choice(StudyParams(**base, medddpm_checkpoint=str(student)))  # default sampler ddim-25
    with pytest.raises(ConfigError, match=f"{re.escape(str(student))} is a 1-step distilled student.*not 4"):
        check_generator_choice(StudyParams(**base, sampler="distilled", medddpm_checkpoint=str(student),
                                           sampling_steps=4))
    with pytest.raises(ConfigError, match="is a distilled student: the study fine-tunes medddpm_init"):
        check_generator_choice(StudyParams(**base, medddpm_init=str(student)))
    ok = StudyParams(**base, sampler="distilled", medddpm_checkpoint=str(student))
    check_generator_choice(ok)
    assert synthesis_steps(ok) == 1 and ok.sampling_steps == 25  # the card's steps; the parameter (and key) as given
    check_generator_choice(StudyParams(**base, medddpm_checkpoint=str(teacher)))  # any other generator: as before


def test_study_cli_refuses_before_the_study_folder_exists(generators, tmp_path, capsys):
    from medddpm.cli import main

    teacher, _ = generators
    out = tmp_path / "study"
    assert main(["study", "--out", str(out), "--profile", "tiny", "--sampler", "distilled",
                 "--checkpoint", str(teacher)]) == 2
    assert f"error: {teacher}: not a distilled student" in capsys.readouterr().err
    assert main(["study", "--out", str(out), "--profile", "tiny", "--sampler", "distilled"]) == 2
    assert "pass it as medddpm_checkpoint" in capsys.readouterr().err
    assert not out.exists()  # no lock file, no Prefect home, no cohort


def test_regenerate_samples_a_student_as_its_card_says(generators):
    from flows.regenerate import sampling_for

    teacher, student = generators
    assert sampling_for(student, "ddim", 25) == ("distilled", 1)  # synth's defaults: the card's own sampler
    assert sampling_for(student, "distilled", 25) == ("distilled", 1)
    assert sampling_for(teacher, "dpmpp2m", 10) == ("dpmpp2m", 10)
    with pytest.raises(ConfigError, match="1-step distilled student.*not 'ddim'"):
        sampling_for(student, "ddim", 10)
    with pytest.raises(InputError, match="not a distilled student") as e:
        sampling_for(teacher, "distilled", 25)
    assert e.value.path == str(teacher)


# ------------------------------------------------------------------------------------ the flows, end to end

def test_study_and_regeneration_on_a_student_record_distilled_n(harness, generators, toy_cohort, tmp_path):
    """A tiny study on a 1-step student: its pool's manifest, the registry and the report say distilled-1; the
    regenerate-cohort flow on that study, with sampler and steps left out, samples the student as its card says.
    A teacher with sampler distilled stops both flows before anything is written."""
    from cohort.manifest import load_manifest
    from flows import registry
    from flows.regenerate import regenerate_cohort
    from flows.study import augment_study

    teacher, student = generators
    study = tmp_path / "study"
    kw = dict(cohort_manifest=str(toy_cohort), profile="tiny", n_real=3, seeds=[0], mixes=["0:1"], holdout_masks=0,
              sampler="distilled", segmenter_config=SEG, parallel=1)
    with pytest.raises(InputError, match="not a distilled student"):
        augment_study(out=str(tmp_path / "refused"), medddpm_checkpoint=str(teacher), **kw)
    assert not (tmp_path / "refused").exists()  # refused before the lock, the cohort or any stage

    augment_study(out=str(study), medddpm_checkpoint=str(student), **kw)
    pool = load_manifest(study / "synthetic" / "study-real-masks" / "data_manifest.csv")
    assert set(pool["sampler"]) == {"distilled-1"} and set(pool["steps"].astype(int)) == {1}
    entry = next(c for c in registry.read_registry(study)["cohorts"] if c["id"] == "study-real-masks")
    assert (entry["sampler"], entry["steps"]) == ("distilled", 1)
    md = (study / "report" / "report.md").read_text()
    assert "## Synthetic images: samplers" in md and "| study-real-masks | distilled-1 | 1 | 3 |" in md
    assert "distilled-1: a progressively distilled N-step student" in md
    assert (f"It is a 1-step student distilled (progressive-distillation, 1 halving round from the teacher's DDIM-2 "
            f"at eta 0) from the generator {teacher}") in md
    assert json.loads((study / "study.json").read_text())["parameters"]["sampler"] == "distilled"

    regen = regenerate_cohort(study_dir=str(study), count=1, max_gate_failures=1)  # an untrained student
    made = load_manifest(regen["manifest"])
    assert list(made["sampler"]) == ["distilled-1"] and list(made["steps"].astype(int)) == [1]
    with pytest.raises(InputError, match="not a distilled student"):
        regenerate_cohort(study_dir=str(study), count=1, checkpoint=str(teacher), sampler="distilled")
    assert [c["id"] for c in registry.read_registry(study)["cohorts"] if c["kind"] == "regenerated"] == ["regen-v001"]


# ---------------------------------------------------------------------------------------- medddpm plan

def _distillation_hours(capsys, *extra: str) -> dict[int, float]:
    """{student steps: hours} from the distillation table `medddpm plan --distill 2 ...` prints."""
    from medddpm.cli import main

    assert main(["plan", "--profile", "tiny", "--on", "cpu", "--tflops", "1e-6", "--n-real", "4", "--n-test", "2",
                 "--backends", "monai", "--seeds", "1", "--mixes", "1:0,0:1", "--distill", "2", *extra]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^distillation \(2 steps\) .* 4 rounds \(DDIM-32 eta 0 -> 2\)", out, re.MULTILINE), out
    assert "synthesis" in out and "x 2 denoising steps (distilled-2" in out
    assert "DDPM-250 250: 125x fewer" in out
    rows = re.findall(r"^\s+([1248])\s+(\d)\s+([\d.]+)\s+\1\s+([\d.]+)x", out, re.MULTILINE)
    assert [(int(n), int(r)) for n, r, _, _ in rows] == [(1, 5), (2, 4), (4, 3), (8, 2)], out
    assert [float(x) for *_, x in rows] == [250.0, 125.0, 62.5, 31.2]
    return {int(n): float(h) for n, _, h, _ in rows}


def test_plan_counts_distillation_hours_that_scale_with_rounds_and_round_steps(capsys):
    from flows.costs import distillation_cost

    short, long = _distillation_hours(capsys, "--round-steps", "100"), _distillation_hours(capsys, "--round-steps",
                                                                                              "300")
    assert short[2] > 0
    for n in (1, 2, 4, 8):
        assert long[n] == pytest.approx(3 * short[n], rel=0.02)
    assert short[1] / short[8] == pytest.approx(5 / 2, rel=0.02)  # hours per round are the same: 5 rounds vs 2
    # one distillation step = two teacher evaluations without gradient + one training step of the same batch
    from synth.config import get_config
    from synth.costs import sample_step_cost, train_step_cost

    cfg = get_config("tiny")
    step = (train_step_cost(cfg, device_type="cpu").flops
            + 2 * cfg.grad_accum * sample_step_cost(cfg, batch=cfg.batch_size, device_type="cpu").flops)
    assert distillation_cost("tiny", 2, round_steps=10, device_type="cpu").flops == pytest.approx(4 * 10 * step)
    with pytest.raises(ConfigError, match="one of"):
        distillation_cost("tiny", 3)


def test_plan_counts_the_distillation_peak_with_grad_checkpoint_and_says_which(capsys):
    """`medddpm plan --distill N --grad-checkpoint` counts the student's training step checkpointed (the training
    rows' count, synth.costs) and its stage and header say so; without the flag, plain fp32."""
    from flows.costs import distillation_cost
    from synth.config import get_config
    from synth.costs import predicted_peak_bytes
    from synth.network import build_unet

    _distillation_hours(capsys, "--grad-checkpoint")  # the table is unchanged: checkpointing adds no counted FLOPs
    from medddpm.cli import main

    argv = ["plan", "--profile", "demo", "--on", "cpu", "--n-real", "4", "--n-test", "2", "--backends", "monai",
            "--seeds", "1", "--mixes", "1:0", "--distill", "2"]
    outs = {}
    for ckpt in (False, True):
        assert main(argv + ["--grad-checkpoint"] * ckpt) == 0
        outs[ckpt] = capsys.readouterr().out
    peak = {ckpt: distillation_cost("demo", 2, device_type="cpu", grad_checkpoint=ckpt).peak_bytes
            for ckpt in (False, True)}
    assert peak[True] < peak[False]
    cfg = get_config("demo")
    params = sum(p.numel() for p in build_unet(cfg).parameters())
    assert peak[True] == pytest.approx(predicted_peak_bytes(cfg, grad_checkpoint=True, device_type="cpu")
                                       + 4 * params)  # the student's checkpointed step + the teacher's weights
    stage = {c: re.search(r"^distillation \(2 steps\)\s+[\d.]+\s+([\d.]+)\s+(.*)$", o, re.MULTILINE)
             for c, o in outs.items()}
    assert stage[True].group(2).endswith("fp32 + activation checkpointing (medddpm distill --grad-checkpoint)")
    assert stage[False].group(2).endswith("volumes, fp32")
    assert [float(stage[c].group(1)) for c in (False, True)] == [round(peak[c] / 2 ** 30, 1) for c in (False, True)]
    for c, o in outs.items():  # the header gives both peaks, the plan's choice first
        line = next(x for x in o.splitlines() if x.startswith("peak memory of distilling (fp32): "))
        first = f"{peak[c] / 2 ** 30:.1f} GiB {'with' if c else 'without'} activation checkpointing"
        assert line.startswith(f"peak memory of distilling (fp32): {first}")
        assert "medddpm distill --grad-checkpoint" in line


@pytest.mark.slow  # two paper-size counts (~40 s): CI runs it with -m slow
def test_paper_brats_distillation_fits_a_40_gb_card_only_with_grad_checkpoint():
    from flows.costs import distillation_cost

    plain, ckpt = (distillation_cost("paper-brats", 2, grad_checkpoint=c).peak_bytes for c in (False, True))
    assert plain > 40e9 > ckpt and ckpt < plain / 2  # 70.2 vs 23.8 GiB counted (2026-12-06)

"""Progressive distillation (synth.distill): the oracle (an analytic denoiser whose N-step student must reproduce its
2N-step DDIM samples), the verb's resume after SIGKILL (same bytes), and synthesis with a distilled student."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core.errors import ConfigError, InputError
from cohort.manifest import load_manifest
from synth.checkpoint import STATE_FILE, load_generator
from synth.distill import (CARD_FILE, DistillConfig, RoundPlan, distill_generator, distillation_loss,
                           student_steps_of, tumour_voxel_weights)
from synth.schedulers import NoiseSchedule, distilled_sampler, make_sampler, sample
from synth.synthesize import SynthesisConfig, synthesize_cohort
from synth.train import train_medddpm
from tests.resume_helpers import kill_once_written, medddpm_command, run_to_end

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the machine is shared

FAST = {"num_threads": 1, "progress": False}
S = 0.3  # the oracle's data: every voxel of x0 ~ N(0, S²)


class LinearV(torch.nn.Module):
    """A v-prediction "network" v̂ = θ_t · x_t (its input's first channel), one scalar per timestep. With θ_t the
    exact coefficient it is the Gaussian data's exact denoiser (the teacher); as a trainable family it holds the
    exact distilled student, since every DDIM step of a linear denoiser is a linear map."""

    def __init__(self, theta: torch.Tensor, trainable: bool):
        super().__init__()
        self.theta = torch.nn.Parameter(theta.clone().float(), requires_grad=trainable)

    def forward(self, inp, t):
        return self.theta[t].view(-1, 1, 1, 1, 1) * inp[:, :1]


def exact_v_coefficients(schedule: NoiseSchedule) -> torch.Tensor:
    """v = (√ᾱ·x_t − E[x0 | x_t])/√(1−ᾱ) with E[x0 | x_t] = √ᾱ·S²/(ᾱS² + 1 − ᾱ)·x_t, per timestep."""
    a = schedule.alphas_cumprod
    return (a.sqrt() - a.sqrt() * S * S / (a * S * S + 1 - a)) / (1 - a).sqrt()


def _samples(model, sampler, steps: int, n: int = 4, side: int = 16) -> torch.Tensor:
    cond = torch.zeros((n, 0, side, side, side))
    return sample(model, sampler, cond, 1, steps, list(range(100, 100 + n)), prediction="v")


def test_oracle_student_reproduces_the_teachers_2n_step_distribution_and_plain_n_steps_do_not():
    """Distil the exact denoiser of Gaussian data from its DDIM-4 (eta 0) to a 2-step student with the module's
    loss and Adam; sampled with the distilled sampler, the student's samples have the teacher's DDIM-4 mean and
    sd (0.161), which the teacher's own DDIM-2 (sd 0.082) misses by far."""
    schedule = NoiseSchedule.build()
    teacher = LinearV(exact_v_coefficients(schedule), trainable=False)
    student = LinearV(exact_v_coefficients(schedule), trainable=True)  # initialised from the teacher (the method)
    plan = RoundPlan.build(schedule.T, 2)
    assert plan.student_ts == (249, 124) and plan.teacher_ts == (249, 187, 124, 62)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        x0 = S * torch.randn((8, 1, 6, 6, 6), generator=g)
        k = torch.randint(0, plan.n, (8,), generator=g)
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        opt.zero_grad()
        distillation_loss(student, teacher, x0, torch.zeros((8, 0, 6, 6, 6)), k, noise, plan, schedule, "v",
                          1.0).backward()
        opt.step()
    ddim0 = make_sampler("ddim", eta=0.0, spacing="leading")
    target = _samples(teacher, ddim0, 4)
    plain = _samples(teacher, ddim0, 2)
    distilled = _samples(student, distilled_sampler(2, schedule), 2)
    assert abs(float(target.std()) - 0.161) < 0.01  # the teacher's DDIM-4, as bench.gaussian_probe measures it
    assert abs(float(distilled.std()) - float(target.std())) < 0.01, (float(distilled.std()), float(target.std()))
    assert abs(float(distilled.mean()) - float(target.mean())) < 0.005
    assert abs(float(plain.std()) - float(target.std())) > 0.05  # so the test can fail: 2 plain steps are far off
    # the same starting noise ends on (nearly) the same sample: the student's step is the teacher's two steps
    assert float((distilled - target).abs().max()) < 1e-3


def test_round_plan_and_settings_are_checked():
    with pytest.raises(ConfigError, match="power of two"):
        DistillConfig(steps=4, teacher_steps=24).rounds()
    with pytest.raises(ConfigError, match="one of"):
        DistillConfig(steps=3, teacher_steps=24).rounds()
    assert DistillConfig(steps=1, teacher_steps=32).rounds() == 5
    for n in (1, 2, 4, 8, 16):  # every other 2n-step timestep is an n-step timestep; the last step ends clean
        plan = RoundPlan.build(250, n)
        assert [plan.triple(k)[0] for k in range(n)] == list(plan.student_ts) and plan.triple(n - 1)[2] == -1


def test_tumour_weights_count_a_tumour_error_more_and_keep_the_loss_scale():
    """--tumour-weight w: a tumour voxel's squared error counts w background voxels' (each sample's weights mean 1,
    so the loss keeps its scale); the same error outside the tumour costs less with it than without."""
    cond = torch.zeros((2, 4, 8, 8, 8))  # brats channels NCR, ED, ET, brain
    cond[:, 3, 2:6, 2:6, 2:6] = 1
    cond[0, 3, 3, 3, 3], cond[0, 2, 3, 3, 3] = 0, 1  # one ET voxel in sample 0; sample 1 has no tumour
    w = tumour_voxel_weights(cond, "brats", 20.0)
    assert w.shape == (2, 1, 8, 8, 8) and torch.allclose(w.flatten(1).mean(1), torch.ones(2))
    assert torch.isclose(w[0, 0, 3, 3, 3] / w[0, 0, 0, 0, 0], torch.tensor(20.0)) and torch.all(w[1] == 1)
    assert tumour_voxel_weights(cond, "brats", 1.0) is None
    head = torch.stack([cond[:, 3], cond[:, 2]], 1)  # wholehead channels: head, tumour
    assert torch.equal(tumour_voxel_weights(head, "wholehead", 20.0)[0], w[0])

    schedule = NoiseSchedule.build(250)
    plan, teacher = RoundPlan.build(250, 1), LinearV(exact_v_coefficients(schedule), trainable=False)
    zeros = torch.zeros((1, 1, 8, 8, 8))  # x0 = noise = 0: x_t, the teacher's chain and the target are all 0

    def loss(err_at, weights):  # a student whose output is wrong by 1 at one voxel
        def student(inp, t):
            return err_at
        return float(distillation_loss(student, teacher, zeros, cond[:1], torch.zeros(1, dtype=torch.long), zeros,
                                       plan, schedule, "v", None, voxel_weights=weights))
    at_tumour, at_background = torch.zeros((1, 1, 8, 8, 8)), torch.zeros((1, 1, 8, 8, 8))
    at_tumour[0, 0, 3, 3, 3], at_background[0, 0, 0, 0, 0] = 1.0, 1.0
    plain = loss(at_tumour, None)
    assert loss(at_tumour, w[:1]) > 10 * plain and loss(at_background, w[:1]) < plain == loss(at_background, None)


def test_warmup_and_tumour_weight_reach_the_rounds_and_the_settings(tmp_path):
    """--warmup-steps is each round's lr warm-up; both settings are part of what a resume must match."""
    from synth.config import get_config
    from synth.distill import round_config

    teacher = tmp_path / "t.safetensors"
    teacher.write_bytes(b"x")
    dc = DistillConfig(steps=2, teacher_steps=8, warmup_steps=50, tumour_weight=20.0)
    assert round_config(get_config("demo"), teacher, dc).warmup_steps == 50
    assert round_config(get_config("demo"), teacher, DistillConfig(steps=2, teacher_steps=8)).warmup_steps == 0
    assert dc.identity()["warmup_steps"] == 50 and dc.identity()["tumour_weight"] == 20.0


@pytest.fixture(scope="module")
def teacher(toy_cohort, tmp_path_factory):
    """A tiny-profile generator (a few steps: the tests check bytes and bookkeeping, not quality)."""
    return train_medddpm(toy_cohort, "tiny", tmp_path_factory.mktemp("teacher"), {**FAST, "steps": 6,
                                                                                  "checkpoint_every": 6})


DISTILL = dict(steps=1, teacher_steps=4, round_steps=6, checkpoint_every=2, num_threads=1, progress=False)


@pytest.fixture(scope="module")
def student(toy_cohort, teacher, tmp_path_factory):
    """An uninterrupted 2-round distillation of the tiny teacher (4 -> 2 -> 1 steps)."""
    return distill_generator(teacher, toy_cohort, tmp_path_factory.mktemp("student"), DistillConfig(**DISTILL))


def test_student_is_a_generator_with_a_card(student, teacher):
    model, cfg, meta = load_generator(student)
    card = json.loads((student.parent / CARD_FILE).read_text())
    from core.fsutil import sha256_file

    assert card["teacher_sha256"] == sha256_file(teacher) and card["student_sha256"] == sha256_file(student)
    assert card["method"] == "progressive-distillation" and card["student_steps"] == 1 and card["rounds"] == 2
    assert card["sampler"] == "distilled-1" and card["settings"]["round_steps"] == 6
    assert json.loads(meta["distillation"])["teacher_sha256"] == card["teacher_sha256"]
    assert student_steps_of(student.parent) == 1 and (student.parent / "intensity_ranges.json").exists()
    teacher_model, _, _ = load_generator(teacher)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                      teacher_model.state_dict().values()))  # it learned


def test_distill_verb_resumes_after_sigkill_to_the_same_bytes(toy_cohort, teacher, student, tmp_path):
    out = tmp_path / "killed"
    cmd = medddpm_command("distill", "--checkpoint", str(teacher), "--manifest", str(toy_cohort), "--out", str(out),
                          "--steps", "1", "--teacher-steps", "4", "--round-steps", "6", "--checkpoint-every", "2",
                          "--threads", "1", "--no-progress")
    kill_once_written(cmd, out / "rounds" / "round-1-4to2" / STATE_FILE)
    assert not (out / "generator.safetensors").exists()  # killed mid-way
    run_to_end(cmd)
    assert (out / "generator.safetensors").read_bytes() == student.read_bytes()
    # other settings in the same folder are refused, not mixed in
    with pytest.raises(InputError, match="other settings.*round_steps"):
        distill_generator(teacher, toy_cohort, out, DistillConfig(**{**DISTILL, "round_steps": 8}))


def test_synthesize_with_the_distilled_sampler_records_it_and_runs_ddim_eta0_on_the_students_steps(
        toy_cohort, teacher, student, tmp_path):
    out = synthesize_cohort(student, toy_cohort, tmp_path / "syn", SynthesisConfig(
        count=1, sampler="distilled", steps=1, max_retries=0, **FAST))
    row = load_manifest(out).iloc[0]
    assert row["sampler"] == "distilled-1" and int(row["steps"]) == 1
    from cohort.manifest import case_files
    from cohort.nifti import read_array, read_label
    from synth.network import condition_from_label

    model, cfg, _ = load_generator(student)
    lab, _ = read_label(case_files(out, row).label)
    x = sample(model, make_sampler("ddim", eta=0.0, spacing="leading"), condition_from_label(lab, cfg.condition)[None],
               cfg.out_channels, 1, [int(row["seed"])], prediction=cfg.prediction)
    written = read_array(case_files(out, row).images["t1"])[0]
    np.testing.assert_allclose(written, x[0, 0].numpy(), atol=1e-6)  # the plain DDIM eta 0 chain, 1 step
    with pytest.raises(ConfigError, match="1-step distilled student"):
        synthesize_cohort(student, toy_cohort, tmp_path / "syn2", SynthesisConfig(
            count=1, sampler="distilled", steps=4, **FAST))
    with pytest.raises(InputError, match="not a distilled student"):
        synthesize_cohort(teacher, toy_cohort, tmp_path / "syn3", SynthesisConfig(
            count=1, sampler="distilled", steps=1, **FAST))


@pytest.mark.parametrize("changes", [{"architecture": "authors", "attention_levels": (False, False, True)},
                                     {"prediction": "v"}], ids=["authors-architecture", "v-prediction"])
def test_generators_of_either_architecture_and_prediction_distil_and_sample(toy_cohort, tmp_path, changes):
    """An (untrained) generator of the authors' network, and a v-prediction one, go through one round and
    synthesis with the distilled sampler; a v-teacher's loss counts the x0 error with truncated SNR (floor 1)."""
    from synth.checkpoint import save_generator
    from synth.config import get_config
    from synth.network import build_unet

    cfg = get_config("tiny").replace(**changes)
    torch.manual_seed(0)
    gen = save_generator(tmp_path / "gen" / "generator.safetensors", build_unet(cfg), cfg, 0)
    student = distill_generator(gen, toy_cohort, tmp_path / "student", DistillConfig(**{**DISTILL, "round_steps": 2,
                                                                                         "teacher_steps": 2}))
    card = json.loads((student.parent / CARD_FILE).read_text())
    assert card["teacher_architecture"] == cfg.architecture and card["teacher_prediction"] == cfg.prediction
    assert card["loss_weight_floor"] == (1.0 if cfg.prediction == "v" else None)
    _, scfg, _ = load_generator(student)
    assert scfg.architecture == cfg.architecture and scfg.prediction == cfg.prediction
    out = synthesize_cohort(student, toy_cohort, tmp_path / "syn", SynthesisConfig(
        count=1, sampler="distilled", steps=1, max_retries=0, **FAST))
    assert load_manifest(out).iloc[0]["sampler"] == "distilled-1"


def test_grad_checkpoint_is_the_same_distillation_step_in_less_memory(tmp_path, monkeypatch):
    """`medddpm distill --grad-checkpoint` reaches DistillConfig and each round's training config (a runtime
    setting, not part of what a resume must match), whose student then keeps fewer activations for its backward
    pass while its loss and gradients are those of the plain student, bit for bit on the CPU."""
    from medddpm.cli import build_parser
    from synth.config import get_config
    from synth.distill import round_config
    from synth.network import build_unet

    configs = []

    def distill_generator(checkpoint, manifest, out, config):
        configs.append(config)
        return out

    monkeypatch.setattr("synth.distill.distill_generator", distill_generator)
    argv = ["distill", "--checkpoint", "t", "--manifest", "m", "--out", str(tmp_path / "o"), "--steps", "1", "--force"]
    for flag in ([], ["--grad-checkpoint"]):
        args = build_parser().parse_args(argv + flag)
        assert args.func(args) == 0
    assert [c.grad_checkpoint for c in configs] == [False, True] and configs[0].identity() == configs[1].identity()

    cfg = get_config("tiny")
    teacher_file = tmp_path / "t.safetensors"
    teacher_file.write_bytes(b"x")
    rounds = {ckpt: round_config(cfg, teacher_file, DistillConfig(steps=2, teacher_steps=4, grad_checkpoint=ckpt))
              for ckpt in (False, True)}
    assert rounds[True].grad_checkpoint and not rounds[False].grad_checkpoint and rounds[True].precision == "fp32"
    assert rounds[True].hash() == rounds[False].hash()  # what synth.train's resume compares
    torch.manual_seed(0)
    teacher = build_unet(cfg).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn((2, cfg.out_channels, 16, 20, 16), generator=g)
    cond = (torch.rand((2, cfg.in_channels - cfg.out_channels, 16, 20, 16), generator=g) > 0.5).float()
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    schedule = NoiseSchedule.build(cfg.timesteps, cfg.schedule)
    step = {}
    for ckpt, rcfg in rounds.items():
        student = build_unet(rcfg).train()  # as synth.train._setup builds the round's network
        student.load_state_dict(teacher.state_dict())
        saved = [0]

        def pack(tn, saved=saved):
            saved[0] += tn.numel() * tn.element_size()
            return tn

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tn: tn):
            loss = distillation_loss(student, teacher, x0, cond, torch.tensor([0, 1]), noise,
                                     RoundPlan.build(schedule.T, 2), schedule, cfg.prediction, None)
        loss.backward()
        step[ckpt] = loss.detach(), [p.grad for p in student.parameters()], saved[0]
    assert torch.equal(step[True][0], step[False][0])
    assert all(torch.equal(a, b) for a, b in zip(step[True][1], step[False][1]))
    assert step[True][2] < 0.5 * step[False][2], (step[True][2], step[False][2])  # the flag took effect


def test_distill_resumes_across_grad_checkpoint_to_the_same_student(toy_cohort, teacher, student, tmp_path):
    """A plain distillation killed mid-way through its last round and resumed with grad_checkpoint (a runtime
    setting: the round's run continues, checkpointed, as its state's config says) ends on the uninterrupted plain
    run's bytes: the same weights, and a student config that does not record the flag."""
    from synth.checkpoint import load_state

    out = tmp_path / "killed"
    cmd = medddpm_command("distill", "--checkpoint", str(teacher), "--manifest", str(toy_cohort), "--out", str(out),
                          "--steps", "1", "--teacher-steps", "4", "--round-steps", "6", "--checkpoint-every", "2",
                          "--threads", "1", "--no-progress")
    state = out / "rounds" / "round-2-2to1" / STATE_FILE
    kill_once_written(cmd, state)
    assert not (out / "generator.safetensors").exists() and int(load_state(state)["step"]) < 6  # killed mid-round
    resumed = distill_generator(teacher, toy_cohort, out, DistillConfig(**DISTILL, grad_checkpoint=True))
    assert json.loads(load_state(state)["config"])["grad_checkpoint"] is True  # round 2 went on checkpointed
    assert resumed.read_bytes() == student.read_bytes()
    assert load_generator(resumed)[1].grad_checkpoint is False


def test_l1_loss_counts_the_absolute_error_with_the_square_root_of_l2s_snr_weight(tmp_path):
    """--loss l1: the student's error counts |d| (l2: d²), each sample weighted by the square root of l2's SNR
    weight (min_snr_weights for l1), so a doubled error doubles the loss; the setting reaches the rounds' training
    config and the settings a resume must match, and an unknown loss is refused before any work."""
    from core.errors import ConfigError
    from synth.config import get_config
    from synth.distill import round_config

    schedule = NoiseSchedule.build(250)
    plan, teacher = RoundPlan.build(250, 4), LinearV(exact_v_coefficients(schedule), trainable=False)
    zeros = torch.zeros((1, 1, 8, 8, 8))  # x0 = noise = 0: x_t, the teacher's chain and the target are all 0

    def loss(d, kind, floor):  # a student whose v is wrong by d at one voxel, at its last step (SNR > 1 there)
        out = torch.zeros((1, 1, 8, 8, 8))
        out[0, 0, 3, 3, 3] = d
        return float(distillation_loss(lambda inp, t: out, teacher, zeros, torch.zeros((1, 0, 8, 8, 8)),
                                       torch.tensor([3]), zeros, plan, schedule, "v", floor, loss=kind))
    assert loss(2.0, "l1", None) == pytest.approx(2 * loss(1.0, "l1", None))
    assert loss(2.0, "l2", None) == pytest.approx(4 * loss(1.0, "l2", None))
    assert loss(-1.0, "l1", None) == pytest.approx(loss(1.0, "l1", None)) == pytest.approx(1 / 512)
    w_l2, w_l1 = loss(1.0, "l2", 1.0) / loss(1.0, "l2", None), loss(1.0, "l1", 1.0) / loss(1.0, "l1", None)
    assert w_l2 != pytest.approx(1.0) and w_l1 == pytest.approx(w_l2 ** 0.5)

    teacher_file = tmp_path / "t.safetensors"
    teacher_file.write_bytes(b"x")
    dc = DistillConfig(steps=2, teacher_steps=8, loss="l1")
    assert round_config(get_config("demo"), teacher_file, dc).loss == "l1" and dc.identity()["loss"] == "l1"
    assert DistillConfig(steps=2, teacher_steps=8).identity()["loss"] == "l2"  # Salimans & Ho's, the default
    with pytest.raises(ConfigError, match="--loss 'huber'"):
        DistillConfig(steps=2, teacher_steps=8, loss="huber").rounds()


def test_distill_stops_before_starting_when_the_students_step_cannot_fit_and_force_runs_it(teacher, monkeypatch,
                                                                                          capsys, tmp_path):
    """As `medddpm train`: the plan's memory model checks a round's student training step (fp32, checkpointed
    with --grad-checkpoint) before any work; the one-line refusal names the device's memory and proposes only what
    distill can change (checkpointing, batch: never bf16), and --force runs it anyway."""
    import synth.costs as costs
    import synth.distill
    from medddpm.cli import main

    started = []
    monkeypatch.setattr(synth.distill, "distill_generator", lambda *a, **k: started.append(a) or tmp_path / "s")
    argv = ["distill", "--checkpoint", str(teacher), "--manifest", str(tmp_path / "m.csv"), "--out",
            str(tmp_path / "out"), "--steps", "1", "--teacher-steps", "4", "--device", "cpu"]
    assert main(argv) == 0 and len(started) == 1  # this machine's memory fits the tiny student by far
    # between the fp32 step's prediction and the checkpointed one's: --grad-checkpoint is the way out
    cfg = synth.distill.round_config(load_generator(teacher)[1], teacher, DistillConfig(steps=1, teacher_steps=4))
    plain = costs.predicted_peak_bytes(cfg, device_type="cpu")
    ckpt = costs.predicted_peak_bytes(cfg, grad_checkpoint=True, device_type="cpu")
    monkeypatch.setattr(costs, "device_memory", lambda device: ((plain + ckpt) / 2, "available RAM"))
    monkeypatch.setattr(costs, "_quick_upper_bound", lambda *a: float("inf"))
    assert main(argv) == 2 and len(started) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "a distillation step of the student (fp32" in err and "--force" in err
    assert "--grad-checkpoint (" in err and "bf16" not in err, err
    assert main([*argv, "--grad-checkpoint"]) == 0 and len(started) == 2
    assert main([*argv, "--force"]) == 0 and len(started) == 3
    half = costs.predicted_peak_bytes(cfg, half_precision=True, device_type="cuda")
    full = costs.predicted_peak_bytes(cfg, device_type="cuda")
    monkeypatch.setattr(costs, "device_memory", lambda device: ((half + full) / 2, "the GPU's memory"))
    on_gpu = [costs.memory_refusal(cfg, torch.device("cuda"), train=True, fp32_only=only) for only in (True, False)]
    assert "bf16" not in on_gpu[0] and "--precision bf16" in on_gpu[1], on_gpu  # train may propose it, distill not


def test_a_folder_made_before_a_setting_existed_resumes_at_its_default_only(tmp_path):
    """distill_settings.json written before --loss existed (no "loss" key) still resumes with the default l2, and a
    run asking for l1 there is refused, naming the setting."""
    from synth.distill import SETTINGS_FILE, _check_settings

    identity = {"method": "progressive-distillation", **DistillConfig(steps=2, teacher_steps=8).identity()}
    older = {k: v for k, v in identity.items() if k != "loss"}
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(older))
    _check_settings(tmp_path, identity)
    l1 = {"method": "progressive-distillation", **DistillConfig(steps=2, teacher_steps=8, loss="l1").identity()}
    with pytest.raises(InputError, match=r"other settings \(loss\)"):
        _check_settings(tmp_path, l1)
    with pytest.raises(InputError, match=r"other settings \(lr\)"):
        _check_settings(tmp_path, {**identity, "lr": 1.0})


def test_clamp_aware_loss_counts_no_error_beyond_a_bound_the_target_sits_on():
    """--clamp-aware: where the teacher's x̃0 lies on a bound of [-1, 1] (air at -1), a student x̂0 beyond that
    bound is no error (the sampler clamps it onto the bound) and one inside it counts in full, with or without the
    flag; where x̃0 lies inside, nothing changes. The teacher here predicts x̂0 = -1.5 everywhere, so its clamped
    two-step chain ends at exactly -1 on the student's last step."""
    from synth.distill import clamp_aware_x0

    target = torch.tensor([-1.0, -1.0, 0.2, 0.2, 1.0, 1.0])
    pred = torch.tensor([-1.3, -0.8, -1.3, 0.5, 1.2, 0.9])
    assert torch.equal(clamp_aware_x0(pred, target), torch.tensor([-1.0, -0.8, -1.3, 0.5, 1.0, 0.9]))

    schedule = NoiseSchedule.build(250)
    plan = RoundPlan.build(250, 2)
    a = schedule.alphas_cumprod.double()

    def predicts_x0(c):  # a v-"network" whose x̂0 is c at every voxel and timestep
        def net(inp, t):
            at = a[t].view(-1, 1, 1, 1, 1)
            return ((at.sqrt() * inp[:, :1].double() - c) / (1 - at).sqrt()).float()
        return net

    shape = (1, 1, 4, 4, 4)
    x0, noise = torch.full(shape, -1.0), torch.randn(shape, generator=torch.Generator().manual_seed(0))
    cond, last = torch.zeros((1, 0, 4, 4, 4)), torch.tensor([plan.n - 1])

    def loss(c, clamp_aware, kind="l1"):
        return float(distillation_loss(predicts_x0(c), predicts_x0(-1.5), x0, cond, last, noise, plan, schedule, "v",
                                       None, loss=kind, clamp_aware=clamp_aware))
    t = plan.student_ts[-1]
    unit = 1 / float((1 - a[t]).sqrt())  # |x̂0 error| in v units at the student's last step
    assert loss(-1.3, False) == pytest.approx(0.3 * unit, rel=1e-4)
    assert loss(-1.3, True) == pytest.approx(0.0, abs=1e-6)
    assert loss(-0.8, True) == pytest.approx(loss(-0.8, False), rel=1e-6) == pytest.approx(0.2 * unit, rel=1e-4)
    assert loss(-1.3, True, "l2") == pytest.approx(0.0, abs=1e-6) and loss(-1.3, False, "l2") > 0.05 * unit ** 2
    # inside the bound (the first step's x̃0 is not at -1 here) the flag changes nothing
    first = torch.tensor([0])
    inside = [float(distillation_loss(predicts_x0(-0.5), predicts_x0(-0.9), x0, cond, first, noise, plan, schedule,
                                      "v", None, loss="l1", clamp_aware=f)) for f in (False, True)]
    assert inside[0] == pytest.approx(inside[1], rel=1e-6) and inside[0] > 0
    assert DistillConfig(steps=2, teacher_steps=8, clamp_aware=True).identity()["clamp_aware"] is True
    assert DistillConfig(steps=2, teacher_steps=8).identity()["clamp_aware"] is False

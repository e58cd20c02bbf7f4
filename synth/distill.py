"""Progressive distillation (Salimans & Ho 2022) of a trained generator into an N-step student.

Round r trains a student, initialised from its teacher, so that ONE deterministic DDIM step (eta 0, the project's
``ddim_update``, x̂0 clamped) of the student from t to t_next lands where TWO DDIM steps of the teacher land
(t -> t_mid -> t_next); the student then teaches the next round at half the steps. The first teacher is the given
generator sampled with DDIM eta 0 at ``teacher_steps``; ``teacher_steps / steps`` must be a power of two. With the
"leading" spacing the N-step timesteps are exactly every other one of the 2N-step timesteps (checked), so the
student samples with the plain ``ddim`` sampler at eta 0 on its N timesteps (synth.schedulers.distilled_sampler).

Why progressive distillation rather than consistency distillation: our fast samplers are already deterministic
DDIM/ODE chains, and progressive distillation's target is exactly "two of those steps" through the same update
function the sampler runs, so a student that meets its target reproduces the teacher's chain by construction
(tests/test_distill.py checks this on an analytic denoiser); consistency distillation needs a new
parametrisation (skip/out scalings) and a new sampler.

Target (Salimans & Ho, Algorithm 2): with x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε from a training case and r =
√(1-ᾱ_next)/√(1-ᾱ_t), the x0 the student must predict is x̃0 = (x_next - r·x_t)/(√ᾱ_next - r·√ᾱ_t), which one DDIM
step maps to the teacher's x_next. The loss is the squared error of the student's own output (ε or v, the
teacher's prediction) against the ε or v of x̃0, weighted per sample by synth.train.min_snr_weights: for a
v-student the x0 error counts max(SNR, 1) ("truncated SNR", the paper's choice; ``snr_weight_floor`` 1), for an
ε-student the output's plain squared error (floor None; a floor of 1 would weigh the noisiest step's ε error by
1/SNR ≈ 10⁸, the instability for which Salimans & Ho leave ε-prediction).

Training reuses synth.train's run: each round is a training run of the student's config (init_from = the round's
teacher) in rounds/round-K/, with its data order, random generator, EMA, atomic checkpoints, loss log and resume
(synth.train._setup and its step loop _train_steps); only each step's loss (teacher targets) is this module's. A run
killed at any point and rerun continues to the same bytes on the CPU (tests/test_distill.py).

The output folder holds generator.safetensors (the final student, in the format synth.train writes, with the card
in its metadata under ``distillation``), distill_card.json (the card plus the student's sha256 and the measured
time), intensity_ranges.json and config.json (the quality gate's ranges from the training cases, as train writes).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from core.determinism import deterministic_algorithms, no_tf32
from core.device import resolve_device
from core.errors import ConfigError, InputError
from core.fsutil import atomic_write_text, sha256_file
from core.threads import torch_threads
from cohort.labels import TUMOUR_LABELS
from cohort.profiles import get_profile

from .checkpoint import GENERATOR_FILE, LOSS_LOG, load_generator, resolve_generator, save_generator
from .config import CONDITION_LABELS, MedDDPMConfig
from .data import training_dataset, training_rows
from .distributed import ranks_from_env
from .schedulers import (DISTILLED, NoiseSchedule, convert_model_output, ddim_update, distilled_sampler,
                         eps_from_output, model_input, sampling_timesteps)
from .train import (_Run, _batches, _finish, _resume_state, _setup, _train_steps, _write_run_files,
                    min_snr_weights, training_cases_hash)

METHOD = "progressive-distillation"
DISTILL_LOSSES = ("l2", "l1")
REFERENCE = "Salimans & Ho 2022, Progressive Distillation for Fast Sampling of Diffusion Models"
CARD_FILE = "distill_card.json"
SETTINGS_FILE = "distill_settings.json"
META_KEY = "distillation"  # safetensors metadata key of a student's card
STUDENT_STEPS = (1, 2, 4, 8)
SPACING = "leading"  # the only spacing whose N-step timesteps are every other 2N-step timestep for every N


@dataclass(frozen=True)
class DistillConfig:
    """How to distil (plain data). Fields up to ``seed`` change the student; the rest only where it runs."""

    steps: int                                   # the student's sampling steps N (STUDENT_STEPS)
    teacher_steps: int = 32                      # the first teacher's DDIM (eta 0) steps: N·2^rounds
    round_steps: int = 1000                      # optimizer steps per halving round
    lr: float = 1e-4                             # Adam; cosine decay to lr_min within each round
    lr_min: float = 1e-5
    warmup_steps: int = 0                        # linear lr warm-up at the start of each round (fresh Adam state)
    tumour_weight: float = 1.0                   # a tumour voxel's squared error counts this many background's
    loss: str = "l2"                             # "l2" (Salimans & Ho) or "l1": DISTILL_LOSSES
    clamp_aware: bool = False                    # only the error inside ±1 where x̃0 is on the bound: clamp_aware_x0
    batch_size: int | None = None                # None: the teacher's
    grad_accum: int | None = None
    ema_decay: float = 0.99                      # EMA from each round's first step
    snr_weight_floor: float | str | None = "auto"  # "auto": 1 for a v-teacher (truncated SNR), None for ε
    sources: tuple[str, ...] | None = None      # training rows (None: the teacher's, real/train)
    splits: tuple[str, ...] | None = None
    seed: int = 0
    # runtime (not part of what is learned)
    checkpoint_every: int = 100
    num_threads: int | None = None
    progress: bool = True
    device: str = "auto"
    deterministic: bool = False
    grad_checkpoint: bool = False                # the student's activation checkpointing: less memory, same math

    # grad_checkpoint is runtime as in synth.config.RUNTIME_FIELDS (a round's training run resumes with or without it)
    RUNTIME = ("checkpoint_every", "num_threads", "progress", "device", "deterministic", "grad_checkpoint")

    def rounds(self) -> int:
        if self.steps not in STUDENT_STEPS:
            raise ConfigError(f"--steps {self.steps}: the student's steps must be one of {STUDENT_STEPS}")
        ratio = self.teacher_steps / self.steps
        k = round(math.log2(ratio)) if ratio >= 2 else 0
        if ratio < 2 or 2 ** k != ratio:
            raise ConfigError(f"--teacher-steps {self.teacher_steps} must be --steps {self.steps} times a power of "
                              "two (at least 2): each round halves the steps")
        if self.round_steps < 1:
            raise ConfigError(f"--round-steps must be >= 1, not {self.round_steps}")
        if self.loss not in DISTILL_LOSSES:
            raise ConfigError(f"--loss {self.loss!r}: one of {', '.join(DISTILL_LOSSES)}")
        return k

    def identity(self) -> dict:
        d = asdict(self)
        for k in self.RUNTIME:
            d.pop(k)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass(frozen=True)
class RoundPlan:
    """One halving round: the student's n timesteps and the teacher's 2n, the student's every other one."""

    student_ts: tuple[int, ...]
    teacher_ts: tuple[int, ...]

    @classmethod
    def build(cls, T: int, n: int) -> "RoundPlan":
        s, t = sampling_timesteps(T, n, SPACING), sampling_timesteps(T, 2 * n, SPACING)
        if t[::2] != s:  # never seen for T = 250 and n <= 125; refuse rather than train a student the sampler misses
            raise ConfigError(f"the {n}-step timesteps of T = {T} are not every other {2 * n}-step timestep")
        return cls(tuple(s), tuple(t))

    @property
    def n(self) -> int:
        return len(self.student_ts)

    def triple(self, k: int) -> tuple[int, int, int]:
        """(t, t_mid, t_next) of the student's step k; t_next = -1 is the clean image."""
        nxt = self.teacher_ts[2 * k + 2] if 2 * k + 2 < len(self.teacher_ts) else -1
        return self.student_ts[k], self.teacher_ts[2 * k + 1], nxt


def _eps(model, x: torch.Tensor, cond: torch.Tensor, ts: list[int], schedule: NoiseSchedule, prediction: str,
         channels_last: bool = False) -> torch.Tensor:
    """ε̂ of each sample b at its own timestep ts[b] (one batched network call, x's dtype), as sample() computes it."""
    tt = torch.tensor(ts, dtype=torch.long, device=x.device)
    out = model(model_input(x.float(), cond, channels_last), tt).to(x.dtype)
    return torch.cat([eps_from_output(out[b:b + 1], x[b:b + 1], schedule.alpha_bar(t), prediction)
                      for b, t in enumerate(ts)])


@torch.no_grad()
def teacher_two_steps(teacher, x_t: torch.Tensor, cond: torch.Tensor, triples: list[tuple[int, int, int]],
                      schedule: NoiseSchedule, prediction: str, channels_last: bool = False) -> torch.Tensor:
    """x_next of each sample after two teacher DDIM (eta 0) steps t -> t_mid -> t_next (ddim_update, as sampled)."""
    def step(x, frm, to):
        eps = _eps(teacher, x, cond, frm, schedule, prediction, channels_last)
        return torch.cat([ddim_update(x[b:b + 1], eps[b:b + 1], schedule.alpha_bar(f), schedule.alpha_bar(t), 0.0)[0]
                          for b, (f, t) in enumerate(zip(frm, to))])

    x_mid = step(x_t, [t for t, _, _ in triples], [m for _, m, _ in triples])
    return step(x_mid, [m for _, m, _ in triples], [n for _, _, n in triples])


def x0_target(x_t: torch.Tensor, x_next: torch.Tensor, a_t: float, a_next: float) -> torch.Tensor:
    """The x̂0 that one DDIM (eta 0) step t -> t_next maps x_t to x_next with (Salimans & Ho's x̃)."""
    r = math.sqrt(1 - a_next) / math.sqrt(1 - a_t)
    return (x_next - r * x_t) / (math.sqrt(a_next) - r * math.sqrt(a_t))


def output_target(x0: torch.Tensor, x_t: torch.Tensor, a_t: float, prediction: str) -> torch.Tensor:
    """The network output (ε or v) whose x̂0 at x_t is x0 (the inverse of convert_model_output)."""
    if prediction == "epsilon":
        return (x_t - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    return (math.sqrt(a_t) * x_t - x0) / math.sqrt(1 - a_t)


def tumour_voxel_weights(cond: torch.Tensor, condition: str, tumour_weight: float) -> torch.Tensor | None:
    """(B, 1, ...) weights of each voxel's squared error: tumour_weight inside the tumour (the condition channels
    of tumour labels), 1 elsewhere, scaled to mean 1 per sample (so the loss keeps its scale); None for weight 1.
    Why: at the demo grid the tumour is ~1 % of the voxels (NCR ~0.06 %), so the plain mean lets a student get the
    tumour's sub-regions wrong at almost no cost, and the segmenters trained on its images learn them from it."""
    if tumour_weight == 1.0:
        return None
    chans = [c for c, vals in enumerate(CONDITION_LABELS[condition]) if set(vals) <= set(TUMOUR_LABELS)]
    tumour = cond[:, chans].sum(1, keepdim=True).clamp(max=1.0)
    w = 1.0 + (tumour_weight - 1.0) * tumour
    return w / w.flatten(1).mean(1).view(-1, *([1] * (w.ndim - 1)))


def clamp_aware_x0(x0_student: torch.Tensor, x0_target: torch.Tensor) -> torch.Tensor:
    """The student's x̂0 as its error should count where the target x̃0 lies on or beyond a bound of [-1, 1]: the
    sampler clamps x̂0 there (ddim_update), so a prediction beyond that bound lands on it and is no error; one on the
    inside counts in full. Elsewhere x̂0 itself. Why: where the truth is the bound (air, -1), the symmetric errors of
    a plain l1/l2 student are cut on one side by the sampler's clamp and kept on the other, which lifts a region's
    median off the bound; compared with the clamped target (x̃0 clamped), this error is zero only for a prediction
    at or beyond it, so the student learns to err outside, where the clamp removes the error (decisions/0019)."""
    low, high = x0_target <= -1.0, x0_target >= 1.0
    return torch.where(low, x0_student.clamp(min=-1.0), torch.where(high, x0_student.clamp(max=1.0), x0_student))


def distillation_loss(student, teacher, x0: torch.Tensor, cond: torch.Tensor, k: torch.Tensor, noise: torch.Tensor,
                      plan: RoundPlan, schedule: NoiseSchedule, prediction: str, snr_weight_floor: float | None,
                      channels_last: bool = False, voxel_weights: torch.Tensor | None = None,
                      loss: str = "l2", clamp_aware: bool = False) -> torch.Tensor:
    """The mean weighted squared (loss "l2") or absolute ("l1") error of the student's output at x_t (sample b at
    its step k[b]) against the output whose DDIM step lands on the teacher's two-step x_next. x0, noise: (B, C, ...);
    the chain in float64. voxel_weights: (B, 1, ...) per-voxel weights of the error (tumour_voxel_weights), None:
    all 1. The per-sample SNR weight is min_snr_weights' for that loss (l1: the square root of l2's).
    Why l1 exists: the teacher's steps clamp x̂0 to [-1, 1], so where the truth sits on the bound (air, -1) its
    targets are the truth plus the positive part of its errors; a student regressing to their mean (l2) lifts the
    background, one regressing to their median (l1) does not (docs/decisions/0019).
    clamp_aware: the error is that of the student's x̂0 after clamp_aware_x0 (the student's output is turned to x̂0,
    passed through it and turned back, so the error keeps its scale and SNR weight)."""
    triples = [plan.triple(int(kb)) for kb in k]
    a = [schedule.alpha_bar(t) for t, _, _ in triples]
    x0, noise = x0.double(), noise.to(x0.device).double()
    x_t = torch.cat([math.sqrt(a[b]) * x0[b:b + 1] + math.sqrt(1 - a[b]) * noise[b:b + 1] for b in range(len(a))])
    x_next = teacher_two_steps(teacher, x_t, cond, triples, schedule, prediction, channels_last)
    x0_tilde = [x0_target(x_t[b:b + 1], x_next[b:b + 1], a[b], schedule.alpha_bar(triples[b][2]))
                for b in range(len(a))]
    tt = torch.tensor([t for t, _, _ in triples], dtype=torch.long, device=x0.device)
    out = student(model_input(x_t.float(), cond, channels_last), tt).float()
    if clamp_aware:  # the error in x0 through clamp_aware_x0, back in output units (the same scale as without)
        out = torch.cat([output_target(clamp_aware_x0(convert_model_output(out[b:b + 1].double(), x_t[b:b + 1], a[b],
                                                                           prediction)[1], x0_tilde[b]),
                                       x_t[b:b + 1], a[b], prediction) for b in range(len(a))]).float()
        x0_tilde = [x.clamp(-1.0, 1.0) for x in x0_tilde]
    target = torch.cat([output_target(x0_tilde[b], x_t[b:b + 1], a[b], prediction) for b in range(len(a))]).float()
    err = (out - target).abs() if loss == "l1" else (out - target).pow(2)
    per_sample = (err if voxel_weights is None else err * voxel_weights).flatten(1).mean(1)
    if snr_weight_floor is None:  # the plain squared error of the output (ε or v)
        return per_sample.mean()
    w = min_snr_weights(schedule.alphas_cumprod, tt.cpu(), None, prediction, loss, snr_weight_floor).to(out.device)
    return (per_sample * w).mean()


def weight_floor(setting, prediction: str) -> float | None:
    if setting == "auto":
        return 1.0 if prediction == "v" else None
    return None if setting is None else float(setting)


def round_config(teacher_cfg: MedDDPMConfig, teacher_path: Path, dc: DistillConfig) -> MedDDPMConfig:
    """A round's student as a training config: the teacher's network, init_from the round's teacher (by sha256),
    and the distillation recipe in the training fields (Min-SNR off, the floor as the loss weight, dc.loss, fp32);
    ``dc.grad_checkpoint`` checkpoints the student's blocks as `medddpm train --grad-checkpoint` does (the teacher
    runs without gradients, where checkpointing is inactive)."""
    floor = weight_floor(dc.snr_weight_floor, teacher_cfg.prediction)
    changes = dict(init_from=str(teacher_path), init_from_sha256=sha256_file(teacher_path), loss=dc.loss,
                   min_snr_gamma=None, snr_weight_floor=floor, lr=dc.lr, lr_schedule="cosine", lr_min=dc.lr_min,
                   warmup_steps=dc.warmup_steps, ema_decay=dc.ema_decay, ema_every=1, ema_start=0, seed=dc.seed,
                   steps=dc.round_steps, checkpoint_every=dc.checkpoint_every, num_threads=dc.num_threads,
                   progress=dc.progress, device=dc.device, precision="fp32", grad_checkpoint=dc.grad_checkpoint,
                   deterministic=dc.deterministic)
    for name in ("batch_size", "grad_accum", "sources", "splits"):
        if getattr(dc, name) is not None:
            changes[name] = getattr(dc, name)
    return teacher_cfg.replace(**changes)


def _round_dir(out: Path, r: int, n: int) -> Path:
    return out / "rounds" / f"round-{r}-{2 * n}to{n}"


def _check_settings(out: Path, identity: dict) -> None:
    path = out / SETTINGS_FILE
    if path.exists():
        old = json.loads(path.read_text())
        # a setting added after the folder was made (e.g. loss) reads as its default there, so older runs resume
        fields = DistillConfig.__dataclass_fields__
        old = {**{k: v for k, v in identity.items() if k in fields and v == fields[k].default}, **old}
        if old != identity:
            diff = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise InputError(path, f"this folder holds a distillation with other settings ({', '.join(diff)}); "
                                   "rerun with the same ones to resume, or use another --out", kind="config-mismatch")
    else:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(identity, indent=1, sort_keys=True))


def distill_generator(checkpoint: str | Path, manifest: str | Path, out_dir: str | Path,
                      config: DistillConfig) -> Path:
    """Distil the generator ``checkpoint`` into a ``config.steps``-step student on the training rows of
    ``manifest``; return out_dir/generator.safetensors. Rerunning the same call resumes (every round is a
    resumable training run); other settings in the same folder are refused."""
    rounds = config.rounds()
    teacher_path = resolve_generator(checkpoint)
    _, teacher_cfg, _ = load_generator(teacher_path)
    teacher_sha = sha256_file(teacher_path)
    out = Path(out_dir)
    ranks = ranks_from_env()
    if ranks.distributed:
        raise ConfigError("medddpm distill runs in one process (no torchrun)")
    identity = {"method": METHOD, "teacher_sha256": teacher_sha, **config.identity()}
    _check_settings(out, identity)
    schedule = NoiseSchedule.build(teacher_cfg.timesteps, teacher_cfg.schedule)
    device = resolve_device(config.device)
    started = time.perf_counter()
    with deterministic_algorithms(config.deterministic), torch_threads(config.num_threads), no_tf32():
        cfg = round_config(teacher_cfg, teacher_path, config)
        rows = training_rows(manifest, cfg)
        cases_hash = training_cases_hash(rows)
        dataset = training_dataset(manifest, cfg, rows, shape=get_profile(cfg.profile).shape)
        current, n = teacher_path, config.teacher_steps
        for r in range(1, rounds + 1):
            n //= 2
            cfg = round_config(teacher_cfg, current, config)
            current = _distil_round(cfg, _round_dir(out, r, n), RoundPlan.build(schedule.T, n), schedule, dataset,
                                    cases_hash, device, ranks, config.tumour_weight, config.clamp_aware)
        student, cfg, meta = load_generator(current)
        # the student's config names the teacher it was distilled from (by sha256), not the last round's folder, so
        # its bytes do not depend on where --out lies; nor on --grad-checkpoint (memory only, the same weights: the
        # config says False, as every student's did before the flag)
        cfg = cfg.replace(init_from=str(teacher_path), init_from_sha256=teacher_sha, grad_checkpoint=False)
        _write_run_files(out, manifest, cfg, rows, cases_hash, dataset, device)
    card = {"method": METHOD, "reference": REFERENCE, "teacher": str(teacher_path), "teacher_sha256": teacher_sha,
            "teacher_prediction": teacher_cfg.prediction, "teacher_architecture": teacher_cfg.architecture,
            "teacher_sampler": f"ddim(eta=0)/{SPACING}", "teacher_steps": config.teacher_steps,
            "student_steps": config.steps, "sampler": distilled_sampler(config.steps, schedule).label(),
            "student_timesteps": list(RoundPlan.build(schedule.T, config.steps).student_ts),
            "rounds": rounds, "settings": config.identity(),
            "loss_weight_floor": weight_floor(config.snr_weight_floor, teacher_cfg.prediction),
            "training_cases_hash": cases_hash, "network_evaluations_per_volume": config.steps}
    final = save_generator(out / GENERATOR_FILE, student, cfg, int(meta["step"]) * rounds,
                           extra_meta={META_KEY: json.dumps(card, sort_keys=True)})
    seconds = _round_seconds(out, rounds, config)
    atomic_write_text(out / CARD_FILE, json.dumps({**card, "student_sha256": sha256_file(final),
                                                   "round_seconds": seconds,
                                                   "this_call_seconds": round(time.perf_counter() - started, 1)},
                                                  indent=1, sort_keys=True))
    return final


def _round_seconds(out: Path, rounds: int, config: DistillConfig) -> list[float]:
    """Each round's summed step time from its loss log (the time of distilling, over resumes)."""
    import pandas as pd

    n, secs = config.teacher_steps, []
    for r in range(1, rounds + 1):
        n //= 2
        log = _round_dir(out, r, n) / LOSS_LOG
        secs.append(round(float(pd.read_csv(log)["seconds"].sum()), 1) if log.exists() else 0.0)
    return secs


def _distil_round(cfg: MedDDPMConfig, out: Path, plan: RoundPlan, schedule: NoiseSchedule, dataset, cases_hash: str,
                  device, ranks, tumour_weight: float = 1.0, clamp_aware: bool = False) -> Path:
    """One halving round as a resumable training run of the student (synth.train's run and checkpoints)."""
    out.mkdir(parents=True, exist_ok=True)
    state = _resume_state(out, cfg, cases_hash)
    if state is not None and int(state["step"]) >= cfg.steps and (out / GENERATOR_FILE).exists():
        return out / GENERATOR_FILE
    teacher, _, _ = load_generator(cfg.init_from)
    teacher = teacher.to(device).eval().requires_grad_(False)
    run = _setup(cfg, out, device, ranks, len(dataset), cases_hash, state)
    _train_steps(run, _batches(dataset, run),
                 lambda run_, batches: _distillation_backward(run_, batches, teacher, plan, schedule, tumour_weight,
                                                              clamp_aware),
                 desc=f"distil {2 * plan.n}->{plan.n} steps", what="distillation")
    _finish(run)
    return out / GENERATOR_FILE


def _distillation_backward(run: _Run, batches, teacher, plan: RoundPlan, schedule: NoiseSchedule,
                           tumour_weight: float = 1.0, clamp_aware: bool = False) -> float:
    """The forward and backward passes of one distillation step (synth.train._train_steps runs the rest of the
    step): each micro-batch draws its student steps k, then its noise, from the run's generator (checkpointed: a
    resume continues them); returns the step's mean loss."""
    cfg = run.cfg
    shape = (cfg.out_channels, *get_profile(cfg.profile).shape)
    total = 0.0
    for _ in range(cfg.grad_accum):
        x0, cond = next(batches)
        k = torch.randint(0, plan.n, (x0.shape[0],), generator=run.rng)
        noise = torch.randn((x0.shape[0], *shape), generator=run.rng, dtype=torch.float64)
        cond = cond.to(run.device)
        loss = distillation_loss(run.model, teacher, x0.to(run.device), cond, k, noise, plan, schedule,
                                 cfg.prediction, cfg.snr_weight_floor, cfg.channels_last,
                                 tumour_voxel_weights(cond, cfg.condition, tumour_weight), cfg.loss, clamp_aware)
        (loss / cfg.grad_accum).backward()
        total += float(loss.detach()) / cfg.grad_accum
    return total


def student_card(meta: dict, path: Path | str = "generator") -> dict:
    """The distillation card in a generator's safetensors metadata; an InputError naming the file if it has none."""
    if META_KEY not in meta:
        raise InputError(path, f"not a distilled student (no '{META_KEY}' card in its metadata): sampler "
                               f"{DISTILLED!r} needs a generator made by `medddpm distill`", kind="bad-checkpoint")
    return json.loads(meta[META_KEY])


def student_steps_of(checkpoint: str | Path) -> int:
    """A distilled student's sampling steps, from its card (an InputError naming the file if it is no student)."""
    return int(read_student_card(checkpoint)["student_steps"])


def read_student_card(checkpoint: str | Path) -> dict:
    """A distilled student's card from its own metadata, wherever the file lies (an InputError naming the file if
    it is no student or unreadable)."""
    from safetensors import safe_open

    path = resolve_generator(checkpoint)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:
        raise InputError(path, f"not a readable safetensors generator ({type(e).__name__}: {e})",
                         kind="unreadable") from e
    return student_card(meta, path)

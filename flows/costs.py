"""`medddpm plan`: the work of an augment study before it starts (cases, Med-DDPM training steps, synthetic
volumes, segmenter runs) with estimated accelerator hours and peak memory per stage, so a user knows whether the
paper protocol fits their hardware.

Costs are counted, not guessed: each network is built on PyTorch's meta device at the study's grid and one step
is run under torch.utils.flop_counter (synth.costs; segmenters below), which gives its floating-point operations
and the activations autograd keeps. Hours = operations / sustained throughput. The throughput is the one
assumption: ``--tflops`` (default 60 for a GPU, an A100-class card in bf16 on 3-D convolutions; 0.037 for
``--on cpu``, the 37 GFLOP/s measured for a training step on 2 cores, docs/benchmarks.md). bench/gpu_check.sh
measures real seconds per step on a GPU; divide its FLOPs by its seconds for your card's number.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from core.errors import ConfigError

from .mixes import SynthesisPlan, parse_mixes, trainings_per_seed
from .plan import SEGMENTER_PROFILE

CPU_TFLOPS = 0.037   # measured: the demo training step at 37.3 GFLOP/s on 2 cores (docs/benchmarks.md)
GPU_TFLOPS = 60.0    # assumed sustained bf16 throughput of an A100-class GPU on 3-D convolutions (not measured here)
GIB = 2 ** 30


@dataclass
class StageCost:
    """One stage of a study: what it does, its floating-point operations and its peak memory."""

    name: str
    work: str
    flops: float
    peak_bytes: float

    def hours(self, tflops: float) -> float:
        return self.flops / (tflops * 1e12) / 3600


def segmenter_step_cost(backend: str, seg_profile: str, grid: tuple[int, int, int], in_channels: int
                        ) -> tuple[float, float, int, str]:
    """(FLOPs of one training iteration, peak bytes, iterations per run, description) of a segmenter run.

    MONAI: the configured SegResNet/DynUNet at its patch (or the whole volume) and batch. nnU-Net: its budget
    (segment.config) on a DynUNet shaped like nnU-Net's 3d_fullres plan for BraTS (6 stages, 32-320 filters,
    128^3 patches or the whole volume if smaller, batch 2) — nnU-Net plans its own network per dataset, so this
    is an estimate of its size, not its plan."""
    from segment.config import SegmenterConfig
    from synth.costs import forward_backward_cost

    cfg = SegmenterConfig(backend=backend, profile=seg_profile).resolved()
    if backend == "monai":
        from segment.monai_backend import build_network

        patch = tuple(cfg.patch_size or grid)
        batch, iters = cfg.batch_size, cfg.epochs * cfg.iters_per_epoch
        with torch.device("meta"):
            net = build_network(cfg, in_channels)
        what = f"{cfg.network} at {patch}, batch {batch}"
    else:
        from monai.networks.nets import DynUNet

        patch = tuple(min(128, s) for s in grid)
        levels = 6 if min(patch) >= 64 else 4
        batch, iters = 2, cfg.epochs * cfg.iters_per_epoch
        with torch.device("meta"):
            net = DynUNet(3, in_channels, 4, [3] * levels, [1] + [2] * (levels - 1), [2] * (levels - 1),
                          filters=[min(32 * 2 ** i, 320) for i in range(levels)], norm_name="instance")
        what = f"nnU-Net-like U-Net at {patch}, batch {batch}"
    flops, saved = forward_backward_cost(net, torch.zeros((batch, in_channels, *patch), device="meta"))
    params = sum(p.numel() for p in net.parameters())
    return flops, params * 16 + saved, iters, what


def estimate_study_cost(profile: str, n_real: int, n_test: int, mixes, backends, seeds, *,
                        medddpm_steps: int | None = None, sampling_steps: int | None = None,
                        half_precision: bool = True, grad_checkpoint: bool = False,
                        seg_profile: str | None = None, device_type: str = "cuda",
                        distill: dict | None = None) -> list[StageCost]:
    """The stages of an augment study with their FLOPs and peak memory (see the module docstring). ``distill``:
    {"steps": N[, "round_steps", "teacher_steps", "grad_checkpoint"]} adds distilling the trained generator into an
    N-step student (distillation_cost) and synthesises with it (N steps, sampler distilled-N)."""
    from cohort.profiles import get_profile
    from synth import defaults
    from synth.config import get_config
    from synth.costs import sample_step_cost, train_step_cost

    cfg = get_config(profile)
    steps = medddpm_steps or cfg.steps
    k = distill["steps"] if distill else sampling_steps or defaults.STEPS
    sampler = f"distilled-{k}" if distill else defaults.SAMPLER
    mix_list = parse_mixes(mixes)
    synth_plan = SynthesisPlan.for_mixes(mix_list, n_real)
    volumes = synth_plan.from_real_masks + synth_plan.from_edited_masks
    train = train_step_cost(cfg, half_precision=half_precision, grad_checkpoint=grad_checkpoint,
                            device_type=device_type)
    sample = sample_step_cost(cfg, batch=defaults.BATCH_SIZE, device_type=device_type)
    stages = [StageCost("Med-DDPM training", f"{steps} steps x {cfg.batch_size * cfg.grad_accum} volumes "
                                             f"({train.parameters / 1e6:.1f} M parameters, {cfg.profile} grid)",
                        train.flops * steps, train.peak_bytes),
              *([distillation_cost(profile, k, teacher_steps=distill.get("teacher_steps"),
                                   round_steps=distill.get("round_steps"), device_type=device_type,
                                   grad_checkpoint=bool(distill.get("grad_checkpoint")))]
                if distill else []),
              StageCost("synthesis", f"{volumes} volumes x {k} denoising steps ({sampler}, batch "
                                     f"{defaults.BATCH_SIZE}; quality-gate redraws not counted)",
                        sample.flops * k * volumes / defaults.BATCH_SIZE, sample.peak_bytes)]
    grid = get_profile(cfg.profile).shape
    seg_profile = seg_profile or SEGMENTER_PROFILE.get(profile, "paper")
    for backend in backends:
        flops, peak, iters, what = segmenter_step_cost(backend, seg_profile, grid, len(cfg.modalities))
        per_seed = trainings_per_seed(mix_list)  # a staged arm ("0:1>1:0") adds its fine-tuning (and pre-training)
        runs = per_seed * len(seeds)
        extra = f" + {per_seed - len(mix_list)} pre-training" if per_seed > len(mix_list) else ""
        stages.append(StageCost(f"segmenters ({backend})", f"{runs} runs ({len(mix_list)} mixes{extra} x "
                                                           f"{len(seeds)} seeds) x {iters} iterations, {what}; "
                                                           f"{n_test} test cases",
                                flops * iters * runs, peak))
    return stages


def distillation_cost(profile: str, student_steps: int, *, teacher_steps: int | None = None,
                      round_steps: int | None = None, device_type: str = "cuda",
                      grad_checkpoint: bool = False) -> StageCost:
    """Distilling the profile's generator into a ``student_steps``-step student (synth.distill, DistillConfig's
    defaults unless given): per round, round_steps optimizer steps, each = per micro-batch two teacher network
    evaluations without gradient (synth.costs.sample_step_cost at the training batch) + one student training step
    (synth.costs.train_step_cost); the rounds halve teacher_steps down to student_steps (DistillConfig.rounds).
    The student trains in fp32 without TF32 (synth.distill.round_config, no_tf32), with activation checkpointing
    where ``grad_checkpoint`` (`medddpm distill --grad-checkpoint`); peak: _distillation_step. FLOPs count no
    recomputation (as the training stage's)."""
    from synth.distill import DistillConfig

    dc = DistillConfig(steps=student_steps, **{k: v for k, v in (("teacher_steps", teacher_steps),
                                                                  ("round_steps", round_steps)) if v is not None})
    rounds = dc.rounds()  # ConfigError for an N outside 1, 2, 4, 8 or teacher steps not N times a power of two
    per_step, peak, volumes = _distillation_step(profile, device_type, grad_checkpoint)
    how = "fp32 + activation checkpointing (medddpm distill --grad-checkpoint)" if grad_checkpoint else "fp32"
    return StageCost(f"distillation ({student_steps} steps)",
                     f"{rounds} rounds (DDIM-{dc.teacher_steps} eta 0 -> {student_steps}) x {dc.round_steps} steps x "
                     f"(2 teacher evaluations without gradient + 1 student training step) of {volumes} volumes, {how}",
                     per_step * dc.round_steps * rounds, peak)


@functools.lru_cache(maxsize=8)
def _distillation_step(profile: str, device_type: str, grad_checkpoint: bool = False) -> tuple[float, float, int]:
    """(FLOPs, peak bytes, volumes) of one distillation step of the profile's generator (distillation_cost). Peak:
    the larger of the student's fp32 training step (synth.costs.train_step_cost's count, checkpointed where
    ``grad_checkpoint``, as the plan's "training, fp32 + checkpointing" row) with the teacher's fp32 weights beside
    it, and the teacher's evaluation without gradient (sample_step_cost's count at the training batch) with the
    student's weights, gradients, Adam state and EMA beside it. Not counted: the loss's float64 copies of the
    micro-batch (x0, noise, x_t, the teacher's x_next: 0.63 GiB at paper-brats)."""
    from synth.config import get_config
    from synth.costs import TRAIN_BYTES_PER_PARAM, sample_step_cost, train_step_cost

    cfg = get_config(profile)
    train = train_step_cost(cfg, half_precision=False, grad_checkpoint=grad_checkpoint, device_type=device_type)
    teacher_eval = sample_step_cost(cfg, batch=cfg.batch_size, device_type=device_type)
    peak = max(train.peak_bytes + 4 * train.parameters,
               teacher_eval.peak_bytes + TRAIN_BYTES_PER_PARAM * train.parameters)
    return train.flops + 2 * teacher_eval.flops * cfg.grad_accum, peak, cfg.batch_size * cfg.grad_accum


def distillation_table(profile: str, tflops: float, *, teacher_steps: int | None = None,
                       round_steps: int | None = None, device_type: str = "cuda") -> list[dict]:
    """Per student N in synth.distill.STUDENT_STEPS: the hours of distilling it (distillation_cost at ``tflops``)
    and its network evaluations per volume against DDPM-250's 250 and synth's default sampler's steps."""
    from synth import defaults
    from synth.distill import STUDENT_STEPS, DistillConfig

    rows = []
    for n in STUDENT_STEPS:
        dc = DistillConfig(steps=n, **({"teacher_steps": teacher_steps} if teacher_steps else {}))
        try:
            rounds = dc.rounds()
        except ConfigError:  # teacher steps that are not N times a power of two (>= 2): no such student
            continue
        cost = distillation_cost(profile, n, teacher_steps=dc.teacher_steps, round_steps=round_steps,
                                 device_type=device_type)
        rows.append({"student steps": n, "rounds": rounds,
                     "hours": cost.hours(tflops), "evaluations per volume": n, "vs DDPM-250": 250 / n,
                     f"vs {defaults.SAMPLER}-{defaults.STEPS}": defaults.STEPS / n})
    return rows


def gpu_fit_table(profile: str) -> list[dict]:
    """Per Med-DDPM choice (training: fp32 / bf16 x checkpointing off / on; sampling: batch 4 and 1, fp32), the
    predicted peak on a GPU (synth.costs.predicted_peak_bytes, CUDA's autocast policy, the CUDA context included)
    and whether it fits each card of synth.costs.GPU_SIZES_GB."""
    from synth import defaults
    from synth.config import get_config
    from synth.costs import GPU_SIZES_GB, predicted_peak_bytes

    cfg = get_config(profile)
    rows = []
    for half in (False, True):
        for ckpt in (False, True):
            rows.append((f"training, {'bf16' if half else 'fp32'}{' + checkpointing' if ckpt else ''}",
                         predicted_peak_bytes(cfg, half_precision=half, grad_checkpoint=ckpt)))
    for batch in sorted({defaults.BATCH_SIZE, 1}, reverse=True):
        rows.append((f"sampling, batch {batch} (fp32)", predicted_peak_bytes(cfg, train=False, batch=batch)))
    return [{"what": what, "peak_bytes": peak, **{f"{gb} GB": peak <= gb * 1e9 for gb in GPU_SIZES_GB}}
            for what, peak in rows]


def study_memory_refusal(profile: str, device_name: str | None, *, trains: bool = True,
                         overrides: dict | None = None) -> None:
    """ConfigError before a study starts when the plan's memory model (synth.costs.memory_refusal) says its Med-DDPM
    training step (``trains``) or a sampling network evaluation (synthesize's batch) does not fit the device."""
    from core.device import autocast_dtype, resolve_device
    from core.errors import ConfigError
    from synth import defaults
    from synth.config import get_config
    from synth.costs import memory_refusal

    cfg = get_config(profile, **(overrides or {}))
    device = resolve_device(device_name or cfg.device)
    why = (memory_refusal(cfg, device, train=True, half_precision=autocast_dtype(device, cfg.precision) is not None,
                          grad_checkpoint=cfg.grad_checkpoint) if trains else None)
    why = why or memory_refusal(cfg, device, train=False, batch=defaults.BATCH_SIZE)
    if why:
        raise ConfigError(f"medddpm study: {why}", kind="out-of-memory")


# `medddpm plan --detect` without --variance-from: Dice variance components of one region. seed: the default
# study's real-only TC per-seed means 0.657 / 0.863 / 0.737 (sd 0.10, make study 2026-12-05); case × mix and case ×
# seed: assumed (0.05, 0.08; the per-case TC sd over cases and seeds there was ≈ 0.08), not measured.
ASSUMED_DICE_COMPONENTS = {"seed sd": 0.10, "case × mix sd": 0.05, "case × seed sd": 0.08}
SEED_OPTIONS = (3, 5, 9, 15, 25)
MAX_TEST_CASES = 1000  # about BraTS 2021's labelled cases: more test cases than that is not a plan


def assumed_components():
    from eval.stats import VarianceComponents

    c = ASSUMED_DICE_COMPONENTS
    return VarianceComponents(case=c["case × mix sd"] ** 2, seed=c["seed sd"] ** 2, residual=c["case × seed sd"] ** 2)


def cases_to_detect(delta: float, components, n_seeds: int, *, max_cases: int = MAX_TEST_CASES, alpha: float = 0.05,
                    power: float = 0.8) -> int | None:
    """The fewest test cases with which a paired Δ of ``delta`` between two mixes of n_seeds seeds each is
    detected with ``power`` (eval.stats.min_detectable_delta), or None if even max_cases do not reach it (the
    seeds' training noise alone is too large)."""
    from eval.stats import min_detectable_delta

    def mde(n: int) -> float:
        return min_detectable_delta(components, n, n_seeds, alpha=alpha, power=power)

    if mde(max_cases) > delta:
        return None
    lo, hi = 2, max_cases  # mde falls as cases are added: the smallest n with mde(n) <= delta
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if mde(mid) <= delta else (mid + 1, hi)
    return lo


def seeds_to_detect(delta: float, components, *, max_cases: int = MAX_TEST_CASES, max_seeds: int = 100_000
                    ) -> int | None:
    """The fewest seeds per mix with which some number of test cases up to max_cases detects ``delta``."""
    if cases_to_detect(delta, components, max_seeds, max_cases=max_cases) is None:
        return None
    lo, hi = 2, max_seeds
    while lo < hi:
        mid = (lo + hi) // 2
        reachable = cases_to_detect(delta, components, mid, max_cases=max_cases) is not None
        lo, hi = (lo, mid) if reachable else (mid + 1, hi)
    return lo


def detection_plan(delta: float, components: dict, stages: list[StageCost], n_seeds_planned: int, tflops: float,
                   *, seed_options=SEED_OPTIONS, max_cases: int = MAX_TEST_CASES) -> list[dict]:
    """Per region (components: {region: VarianceComponents}) and seeds per mix (seed_options and the fewest that
    can reach ``delta`` with at most max_cases test cases): the test cases needed to detect ``delta`` at 80 %
    power (α 0.05, two-sided, before any multiplicity adjustment; None: not with max_cases) and the study's
    accelerator hours with that many seeds (the segmenter stages of ``stages``, planned with n_seeds_planned seeds,
    scale with the seeds; evaluating more test cases is not counted)."""
    fixed = sum(s.hours(tflops) for s in stages if not s.name.startswith("segmenters"))
    per_seed = sum(s.hours(tflops) for s in stages if s.name.startswith("segmenters")) / n_seeds_planned
    rows = []
    for region, comp in components.items():
        fewest = seeds_to_detect(delta, comp, max_cases=max_cases)
        for k in sorted({*seed_options, *([fewest] if fewest else [])}):
            n = cases_to_detect(delta, comp, k, max_cases=max_cases)
            rows.append({"region": region, "seeds per mix": k, "test cases": n,
                         "hours": fixed + k * per_seed, "segmenter hours": k * per_seed})
    return rows


def print_detection_plan(delta: float, stages: list[StageCost], n_seeds: int, n_test: int, tflops: float, unit: str,
                         variance_from: str | None = None) -> None:
    """`medddpm plan --detect D`: the minimum detectable Δ of the planned design and, per seeds per mix, the test
    cases needed for D with the hours that costs (``detection_plan``)."""
    from eval.stats import VarianceComponents, min_detectable_delta

    if variance_from:
        from eval.results import read_results
        from eval.stats import variance_components, with_mean_region

        vc = variance_components(with_mean_region(read_results(variance_from, "per_case", required=True)))
        vc = vc[vc["test_set"] == vc["test_set"].iloc[0]] if len(vc) else vc
        components = {f"{r['region']} ({r['backend']})": VarianceComponents(
                          r["case_var"], r["seed_var"], r["residual_var"], r["seed_diff_var"], r["residual_diff_var"])
                      for _, r in vc.iterrows()}
        source = f"measured in {variance_from} (results/per_case.csv)"
    else:
        components = {"one region": assumed_components()}
        source = ("assumed: " + ", ".join(f"{k} {v:g}" for k, v in ASSUMED_DICE_COMPONENTS.items()) +
                  " (seed sd: the default study's TC; pass --variance-from STUDY for measured ones)")
    print(f"\nDetecting a paired Dice Δ of {delta:g} between two mixes (80 % power, two-sided α 0.05, before any "
          f"multiplicity adjustment); variance components {source}.")
    if n_test and n_seeds >= 2:
        for region, comp in components.items():
            print(f"  planned design, {region}: {n_test} test cases x {n_seeds} seeds per mix detects "
                  f"{min_detectable_delta(comp, n_test, n_seeds):.3f}")
    print(f"{'region':<16} {'seeds/mix':>9} {'test cases':>10} {unit + '-hours':>10} {'of which segmenters':>20}")
    for row in detection_plan(delta, components, stages, n_seeds, tflops):
        cases = row["test cases"] if row["test cases"] is not None else f"> {MAX_TEST_CASES}"
        print(f"{row['region']:<16} {row['seeds per mix']:>9} {cases:>10} {row['hours']:>10.1f} "
              f"{row['segmenter hours']:>20.1f}")
    print(f"('> {MAX_TEST_CASES}': not with {MAX_TEST_CASES} test cases, the seeds' training noise is too large; "
          "the largest seed count listed is the fewest that can reach the Δ. Hours: the study with that many seeds "
          "per mix; evaluating the test cases is not counted)")

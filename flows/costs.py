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

from dataclasses import dataclass

import torch

from .mixes import SynthesisPlan, parse_mixes
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
                        seg_profile: str | None = None) -> list[StageCost]:
    """The stages of an augment study with their FLOPs and peak memory (see the module docstring)."""
    from cohort.profiles import get_profile
    from synth import defaults
    from synth.config import get_config
    from synth.costs import sample_step_cost, train_step_cost

    cfg = get_config(profile)
    steps = medddpm_steps or cfg.steps
    k = sampling_steps or defaults.STEPS
    mix_list = parse_mixes(mixes)
    synth_plan = SynthesisPlan.for_mixes(mix_list, n_real)
    volumes = synth_plan.from_real_masks + synth_plan.from_edited_masks
    train = train_step_cost(cfg, half_precision=half_precision, grad_checkpoint=grad_checkpoint)
    sample = sample_step_cost(cfg)
    stages = [StageCost("Med-DDPM training", f"{steps} steps x {cfg.batch_size * cfg.grad_accum} volumes "
                                             f"({train.parameters / 1e6:.1f} M parameters, {cfg.profile} grid)",
                        train.flops * steps, train.peak_bytes),
              StageCost("synthesis", f"{volumes} volumes x {k} denoising steps ({defaults.SAMPLER}; quality-gate "
                                     "redraws not counted)", sample.flops * k * volumes, sample.peak_bytes)]
    grid = get_profile(cfg.profile).shape
    seg_profile = seg_profile or SEGMENTER_PROFILE.get(profile, "paper")
    for backend in backends:
        flops, peak, iters, what = segmenter_step_cost(backend, seg_profile, grid, len(cfg.modalities))
        runs = len(mix_list) * len(seeds)
        stages.append(StageCost(f"segmenters ({backend})", f"{runs} runs ({len(mix_list)} mixes x {len(seeds)} "
                                                           f"seeds) x {iters} iterations, {what}; {n_test} test cases",
                                flops * iters * runs, peak))
    return stages

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

CPU_TFLOPS = 0.037   # measured: the demo training step at 37.3 GFLOP/s on 2 cores (docs/benchmarks.md)
GPU_TFLOPS = 60.0    # assumed sustained bf16 throughput of an A100-class GPU on 3-D convolutions (not measured here)
GIB = 2 ** 30


@dataclass
class Stage:
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


def plan_study(profile: str, n_real: int, n_test: int, mixes, backends, seeds, *, medddpm_steps: int | None = None,
               sampling_steps: int | None = None, half_precision: bool = True, grad_checkpoint: bool = False,
               seg_profile: str | None = None) -> list[Stage]:
    """The stages of an augment study with their FLOPs and peak memory (see the module docstring)."""
    from cohort.profiles import get_profile
    from flows.mixes import SynthesisPlan, parse_mixes
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
    stages = [Stage("Med-DDPM training", f"{steps} steps x {cfg.batch_size * cfg.grad_accum} volumes "
                                         f"({train.parameters / 1e6:.1f} M parameters, {cfg.profile} grid)",
                    train.flops * steps, train.peak_bytes),
              Stage("synthesis", f"{volumes} volumes x {k} denoising steps ({defaults.SAMPLER}; quality-gate "
                                 "redraws not counted)", sample.flops * k * volumes, sample.peak_bytes)]
    grid = get_profile(cfg.profile).shape
    seg_profile = seg_profile or {"tiny": "tiny", "demo": "demo"}.get(profile, "paper")
    for backend in backends:
        flops, peak, iters, what = segmenter_step_cost(backend, seg_profile, grid, len(cfg.modalities))
        runs = len(mix_list) * len(seeds)
        stages.append(Stage(f"segmenters ({backend})", f"{runs} runs ({len(mix_list)} mixes x {len(seeds)} seeds) x "
                                                       f"{iters} iterations, {what}; {n_test} test cases",
                            flops * iters * runs, peak))
    return stages


def register(subparsers) -> None:
    from flows.mixes import DEFAULT_MIXES

    p = subparsers.add_parser(
        "plan", help="print the work of a study and its estimated accelerator hours and peak memory per stage",
        description=__doc__.split("\n\n")[0] + " " + __doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--profile", default="paper-brats", help="Med-DDPM profile (demo, paper-brats, paper-wholehead, "
                                                           "authors-brats, ...; default paper-brats)")
    p.add_argument("--cohort", help="real cohort data_manifest.csv: n_test = its real test rows "
                                    "(and --n-real defaults to its real training rows)")
    p.add_argument("--n-real", type=int, help="real training cases per mix (default: the cohort's, else 1000, "
                                              "the paper's)")
    p.add_argument("--n-test", type=int, default=0, help="real test cases (default: the cohort's)")
    p.add_argument("--mixes", default=",".join(DEFAULT_MIXES), help="comma list of R:S[@real|@edited]")
    p.add_argument("--backends", default="nnunet", help="comma list: monai, nnunet (default nnunet)")
    p.add_argument("--seeds", type=int, default=3, help="segmenter seeds per mix (default 3)")
    p.add_argument("--medddpm-steps", type=int, help="Med-DDPM optimizer steps (default: the profile's)")
    p.add_argument("--sampling-steps", type=int, help="denoising steps per volume (default: synth's default)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (memory estimate)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing (memory estimate)")
    p.add_argument("--on", choices=("gpu", "cpu"), default="gpu", help="throughput default: gpu or cpu")
    p.add_argument("--tflops", type=float, help=f"sustained TFLOP/s (default {GPU_TFLOPS:g} on gpu, an assumption; "
                                                f"{CPU_TFLOPS:g} on cpu, measured)")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    n_real, n_test = args.n_real, args.n_test
    if args.cohort:
        from cohort.manifest import load_manifest, select

        df = load_manifest(args.cohort)
        n_real = n_real or len(select(df, source="real", split="train"))
        n_test = n_test or len(select(df, source="real", split="test"))
    n_real = n_real or 1000
    tflops = args.tflops or (GPU_TFLOPS if args.on == "gpu" else CPU_TFLOPS)
    half = args.on == "gpu" and not args.fp32  # precision auto: bf16 on a GPU, fp32 on a CPU
    stages = plan_study(args.profile, n_real, n_test, [m.strip() for m in args.mixes.split(",") if m.strip()],
                        [b.strip() for b in args.backends.split(",") if b.strip()], list(range(args.seeds)),
                        medddpm_steps=args.medddpm_steps, sampling_steps=args.sampling_steps,
                        half_precision=half, grad_checkpoint=args.grad_checkpoint)
    unit = "GPU" if args.on == "gpu" else "CPU"
    print(f"Study plan: profile {args.profile}, {n_real} real training cases per mix, {n_test} test cases; "
          f"{tflops:g} TFLOP/s sustained ({'given' if args.tflops else 'assumed' if args.on == 'gpu' else 'measured'})")
    print(f"{'stage':<22} {unit + '-hours':>10} {'peak GiB':>9}  work")
    for s in stages:
        print(f"{s.name:<22} {s.hours(tflops):>10.1f} {s.peak_bytes / GIB:>9.1f}  {s.work}")
    total = sum(s.hours(tflops) for s in stages)
    print(f"{'total':<22} {total:>10.1f} {max(s.peak_bytes for s in stages) / GIB:>9.1f}  "
          f"(peak memory: {'bf16 autocast' if half else 'fp32'}"
          f"{', activation checkpointing' if args.grad_checkpoint else ''}; weights, Adam and EMA in fp32)")
    return 0

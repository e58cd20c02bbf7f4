"""CLI verbs of this package (registered by medddpm.cli): train, synthesize."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    _add_train(subparsers)
    _add_synthesize(subparsers)
    _add_synthesize_merge(subparsers)


def _add_train(subparsers) -> None:
    from .config import PROFILES

    p = subparsers.add_parser(
        "train", help="train (or resume) the Med-DDPM mask-conditioned diffusion model",
        description="Train Med-DDPM on the real training rows of a manifest. Checkpoints are written atomically "
                    "every --checkpoint-every steps; rerunning the same command resumes from the last one.")
    p.add_argument("--manifest", required=True, help="data_manifest.csv of the training cohort")
    p.add_argument("--profile", required=True, choices=sorted(PROFILES), help="synth profile (network, grid, recipe)")
    p.add_argument("--out", required=True, help="output folder (checkpoints, loss log, generator)")
    _add_training_recipe(p)
    p.add_argument("--sources", help="comma-separated manifest sources to train on (default: real)")
    p.add_argument("--seed", type=int, help="random seed")
    _add_training_runtime(p)
    p.add_argument("--init-from", help="generator (file or folder, e.g. from import-weights) whose weights and "
                                       "network settings training starts from (fine-tuning)")
    p.set_defaults(func=_train)


def _add_training_recipe(p) -> None:
    """The options of what is learned and for how long (each left out: the profile's value)."""
    from .config import LR_SCHEDULES

    p.add_argument("--steps", type=int, help="total optimizer steps (default: the profile's)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, help="learning-rate schedule (cosine decays to lr_min at "
                                                               "--steps; a resume must keep --steps then)")
    p.add_argument("--lr-min", type=float, help="learning rate the cosine schedule ends at (default: the profile's)")
    p.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps (with either schedule)")
    p.add_argument("--batch-size", type=int, help="volumes per micro-batch")
    p.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step")
    p.add_argument("--loss", choices=("l1", "l2"), help="denoising loss (paper: l1)")
    p.add_argument("--min-snr-gamma", type=_float_or_none, help="Min-SNR-γ loss weighting with this γ (e.g. 5; "
                                                                "'none': unweighted; default: the profile's, none "
                                                                "for the paper profiles)")
    p.add_argument("--snr-weight-floor", type=_float_or_none,
                   help="lower bound of the Min-SNR weight (1: the noisiest steps keep weight 1; 'none': no floor; "
                        "default: the profile's, 1 at demo)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--ema-decay", type=float, help="EMA decay")
    p.add_argument("--ema-every", type=int, help="steps between EMA updates")
    p.add_argument("--ema-start", type=int, help="step before which the EMA is a copy of the model")


def _add_training_runtime(p) -> None:
    """The options of where and how training runs (not what it learns)."""
    from core.device import DEVICE_HELP

    from .config import PRECISIONS

    p.add_argument("--threads", type=int, help="torch threads during training")
    p.add_argument("--device", help=f"where to train: {DEVICE_HELP} (default auto)")
    p.add_argument("--precision", choices=PRECISIONS, help="autocast: auto (default: bf16 on a bf16 GPU, else fp32), "
                                                           "fp32, bf16, fp16 (with loss scaling); weights and EMA "
                                                           "stay fp32")
    p.add_argument("--grad-checkpoint", action="store_true", default=None,
                   help="activation checkpointing: much less GPU memory for ~30 %% more time per step")
    p.add_argument("--data-workers", type=int, help="DataLoader worker processes reading cases (default: 0 on the "
                                                     "CPU, 4 on a GPU)")
    p.add_argument("--cache-rate", type=float, help="share of the training cases kept in RAM (default 0: each case "
                                                    "is read when used)")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic GPU kernels (cuDNN, cuBLAS, torch; slower): a resumed run then repeats its "
                        "loss curve bit for bit on a GPU too (an op without a deterministic kernel warns)")
    p.add_argument("--nproc", type=int, help="train in N processes on this node (one per GPU, or CPU processes): "
                                             "runs torchrun --standalone --nproc_per_node N; several nodes: "
                                             "run torchrun yourself (README)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_synthesize(subparsers) -> None:
    from core.device import DEVICE_HELP

    from . import defaults
    from .schedulers import SAMPLERS, SPACINGS

    s = subparsers.add_parser(
        "synthesize", help="generate a paired image-mask cohort from conditioning masks",
        description="Sample one synthetic image per mask (round-robin over the masks manifest's real and edited "
                    "masks), write image and mask NIfTI pairs plus data_manifest.csv. Resumable; a per-label "
                    "intensity quality gate redraws failures with new seeds.")
    s.add_argument("--checkpoint", required=True, help="generator.safetensors (or the training folder)")
    s.add_argument("--masks", required=True, help="manifest with the conditioning masks (real or source=mask rows)")
    s.add_argument("--count", type=int, required=True, help="number of synthetic cases")
    s.add_argument("--sampler", choices=SAMPLERS, default=defaults.SAMPLER,
                   help=f"ddpm (the paper's, with 250 steps), ddim, dpmpp2m or dpmpp2m-sde (default "
                        f"{defaults.SAMPLER})")
    s.add_argument("--steps", type=int, default=defaults.STEPS,
                   help=f"sampling steps, 1-250 (default {defaults.STEPS}; the paper: ddpm with 250)")
    s.add_argument("--out", required=True, help="output folder")
    s.add_argument("--seed", type=int, default=0, help="base seed")
    s.add_argument("--eta", type=float, default=defaults.ETA,
                   help=f"eta of ddim and dpmpp2m-sde (default {defaults.ETA:g}): 1 adds fresh noise each step (ddim: "
                        "the respaced ancestral chain; dpmpp2m-sde: the reverse SDE); 0 = deterministic ODE "
                        "(docs/medddpm.md)")
    s.add_argument("--spacing", choices=SPACINGS, default=defaults.SPACING,
                   help=f"timestep spacing (default {defaults.SPACING}): leading = every T/n steps; quadratic and "
                        "logsnr end at t = 0 and suit few steps (docs/decisions/0004-sampler-default.md)")
    s.add_argument("--analytic-variance", action=argparse.BooleanOptionalAction, default=defaults.ANALYTIC,
                   help="ddpm and ddim: add Analytic-DPM's x0-uncertainty term to each step's variance (Bao et al. "
                        "2022), which few-step chains otherwise lose (default "
                        f"{'on' if defaults.ANALYTIC else 'off'}; docs/medddpm.md)")
    s.add_argument("--device", default="auto", help=f"where to sample: {DEVICE_HELP} (default auto)")
    s.add_argument("--shard", help="K/N: make only cases i with i %% N == K, into data_manifest.shard-K-of-N.csv of "
                                   "the same --out (one process per GPU or node); 'auto' = torchrun's RANK/WORLD_SIZE "
                                   "(and LOCAL_RANK's GPU). Then: medddpm synthesize-merge --out DIR --shards N "
                                   "--count C")
    s.add_argument("--batch-size", type=int, default=defaults.BATCH_SIZE, help="volumes per network call")
    s.add_argument("--deterministic", action="store_true",
                   help="deterministic GPU kernels (cuDNN, cuBLAS; slower): a seed then repeats its sample bit for "
                        "bit on the same GPU and software (TF32 is off in sampling either way)")
    s.add_argument("--splits", default="train", help="comma-separated splits of mask rows to use ('all' = any)")
    s.add_argument("--max-retries", type=int, default=defaults.MAX_RETRIES, help="quality-gate redraws per case")
    s.add_argument("--threads", type=int, help="torch threads")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_synthesize)


def _add_synthesize_merge(subparsers) -> None:
    m = subparsers.add_parser(
        "synthesize-merge", help="merge the shard manifests of a sharded synthesis into data_manifest.csv",
        description="After `medddpm synthesize --shard K/N` ran for every K: check that each shard holds all its "
                    "cases and write OUT/data_manifest.csv and OUT/quality_report.csv atomically.")
    m.add_argument("--out", required=True, help="the synthesis output folder shared by the shards")
    m.add_argument("--shards", type=int, required=True, help="N, the number of shards")
    m.add_argument("--count", type=int, required=True, help="the --count every shard was given")
    m.set_defaults(func=_merge)


def _train(args) -> int:
    import os
    import sys

    from .train import train_medddpm

    overrides = {"steps": args.steps, "lr": args.lr, "lr_schedule": args.lr_schedule, "lr_min": args.lr_min,
                 "batch_size": args.batch_size, "grad_accum": args.grad_accum, "loss": args.loss,
                 "min_snr_gamma": args.min_snr_gamma, "snr_weight_floor": args.snr_weight_floor,
                 "checkpoint_every": args.checkpoint_every,
                 "ema_decay": args.ema_decay, "ema_every": args.ema_every, "ema_start": args.ema_start,
                 "seed": args.seed, "num_threads": args.threads, "warmup_steps": args.warmup_steps,
                 "device": args.device, "precision": args.precision, "grad_checkpoint": args.grad_checkpoint,
                 "sources": tuple(args.sources.split(",")) if args.sources else None,
                 "data_workers": args.data_workers, "cache_rate": args.cache_rate, "deterministic": args.deterministic,
                 "progress": False if args.no_progress else None, "init_from": args.init_from}
    # 'none' unsets the profile's value; get_config skips None overrides, so those fields are replaced afterwards
    unset = {k: None for k, v in overrides.items() if v == "none"}
    overrides = {k: v for k, v in overrides.items() if v is not None and k not in unset}
    config = overrides
    if unset:
        from .config import get_config

        config = get_config(args.profile, **overrides).replace(**unset)
    if (args.nproc or 1) > 1 and "LOCAL_RANK" not in os.environ:  # not yet inside torchrun: start it
        from core.device import resolve_device

        from .config import get_config
        from .data import rank_shard
        from .distributed import check_nproc, launch

        cfg = get_config(args.profile, **overrides)
        check_nproc(args.nproc, resolve_device(cfg.device))  # one clear error here, not one per process
        rank_shard(cfg.batch_size, cfg.grad_accum, args.nproc)
        return launch(args.nproc, _without_option(getattr(args, "cli_args", None) or sys.argv[1:], "--nproc"))
    path = train_medddpm(args.manifest, args.profile, args.out, config)
    if os.environ.get("RANK", "0") == "0":
        print(f"generator: {path}")
    return 0


def _float_or_none(text: str) -> float | str:
    return "none" if text.lower() == "none" else float(text)


def _without_option(cli_args: list[str], option: str) -> list[str]:
    """cli_args without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for a in cli_args:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _synthesize(args) -> int:
    from .synthesize import SynthesisConfig, synthesize_cohort

    splits = None if args.splits == "all" else tuple(args.splits.split(","))
    config = SynthesisConfig(count=args.count, sampler=args.sampler, steps=args.steps, seed=args.seed, eta=args.eta,
                             spacing=args.spacing, analytic=args.analytic_variance, batch_size=args.batch_size,
                             splits=splits, max_retries=args.max_retries, num_threads=args.threads,
                             progress=not args.no_progress, device=args.device, shard=_shard(args.shard),
                             deterministic=args.deterministic)
    path = synthesize_cohort(args.checkpoint, args.masks, args.out, config)
    print(f"manifest: {path}")
    return 0


def _shard(text: str | None):
    from core.errors import ConfigError

    if text is None or text == "auto":
        return text
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise ConfigError(f"--shard {text!r}: use K/N (e.g. 0/4) or auto") from None
    return k, n


def _merge(args) -> int:
    from .synthesize import merge_shards

    print(f"manifest: {merge_shards(args.out, args.shards, args.count)}")
    return 0

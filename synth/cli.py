"""CLI verbs of this package (registered by medddpm.cli): train, synthesize."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    _add_train(subparsers)
    _add_synthesize(subparsers)
    _add_synthesize_merge(subparsers)
    _add_distill(subparsers)


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
    p.add_argument("--cases-from", metavar="FILE",
                   help="train only on the manifest's training rows listed in FILE (one case ID per line, '#' "
                        "comments); an ID the manifest lacks is an error. The rows go to cases_<sha256>.csv beside "
                        "the manifest (the training record names it) and the list's sha256 to OUT/case_list.json")
    _add_training_runtime(p)
    _add_preview(p)
    p.add_argument("--init-from", help="generator (file or folder, e.g. from import-weights) whose weights and "
                                       "network settings training starts from (fine-tuning)")
    p.add_argument("--wait", help="if another run owns --out: wait this many seconds (or 'unlimited') for it to "
                                  "finish (default: stop at once, saying who owns it)")
    p.add_argument("--force", action="store_true", help="run even if the plan's memory model predicts that the "
                                                        "step does not fit this device's memory")
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


def _add_preview(p) -> None:
    """Training previews (synth.preview): samples on fixed masks while training runs."""
    from .preview import DEFAULT_MASKS, DEFAULT_SAMPLING_STEPS

    p.add_argument("--preview-every", type=int, metavar="N",
                   help="every N optimizer steps and at the last one, write OUT/previews/step_<step>.png and "
                        "OUT/previews/latest.png: samples of the EMA weights (DDIM, eta 0) on fixed training masks "
                        "with fixed seeds, beside the masks' real images, and the loss curve; changes nothing that "
                        "is trained (default: no previews)")
    p.add_argument("--preview-masks", metavar="IDS",
                   help=f"comma-separated training case IDs whose masks the previews sample on (default: "
                        f"{DEFAULT_MASKS} spread over the training rows)")
    p.add_argument("--preview-steps", type=int, default=DEFAULT_SAMPLING_STEPS, metavar="K",
                   help=f"DDIM steps per preview sample (default {DEFAULT_SAMPLING_STEPS})")


def _preview_settings(args):
    """The PreviewConfig of --preview-* (None without --preview-every)."""
    if args.preview_every is None:
        if args.preview_masks:
            from core.errors import ConfigError

            raise ConfigError("--preview-masks needs --preview-every N")
        return None
    from .preview import PreviewConfig

    ids = tuple(c.strip() for c in args.preview_masks.split(",") if c.strip()) if args.preview_masks else None
    return PreviewConfig(every=args.preview_every, case_ids=ids, sampling_steps=args.preview_steps)


def _add_synthesize(subparsers) -> None:
    from core.device import DEVICE_HELP

    from . import defaults
    from .schedulers import DISTILLED, SAMPLERS, SPACINGS

    s = subparsers.add_parser(
        "synthesize", help="generate a paired image-mask cohort from conditioning masks",
        description="Sample one synthetic image per mask (round-robin over the masks manifest's real and edited "
                    "masks), write image and mask NIfTI pairs plus data_manifest.csv. Resumable; a per-label "
                    "intensity quality gate redraws failures with new seeds.")
    s.add_argument("--checkpoint", required=True, help="generator.safetensors (or the training folder)")
    s.add_argument("--masks", required=True, help="manifest with the conditioning masks (real or source=mask rows)")
    s.add_argument("--count", type=int, required=True, help="number of synthetic cases")
    s.add_argument("--sampler", choices=(*SAMPLERS, DISTILLED), default=defaults.SAMPLER,
                   help=f"ddpm (the paper's, with 250 steps), ddim, dpmpp2m or dpmpp2m-sde (default "
                        f"{defaults.SAMPLER}); distilled: a student from `medddpm distill`, sampled as its card says "
                        "(DDIM eta 0 at its own steps)")
    s.add_argument("--steps", type=int,
                   help=f"sampling steps, 1-250 (default {defaults.STEPS}, a distilled student's own; the paper: ddpm "
                        "with 250)")
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
    s.add_argument("--wait", help="if another run owns --out (or this --shard of it): wait this many seconds (or "
                                  "'unlimited') for it to finish (default: stop at once, saying who owns it)")
    s.add_argument("--force", action="store_true", help="run even if the plan's memory model predicts that the "
                                                        "network evaluation does not fit this device's memory")
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


def _listed_cases_manifest(manifest: str, cases_from: str, out: str) -> str:
    """The manifest's rows listed in ``cases_from`` (cohort.case_list), written beside it (same data root) as
    cases_<sha256 of the list, 12 hex>.csv; the list is recorded in out/case_list.json."""
    from pathlib import Path

    from cohort.case_list import read_case_list, write_record, write_subset

    cases = read_case_list(cases_from)
    subset = write_subset(manifest, cases)
    Path(out).mkdir(parents=True, exist_ok=True)
    write_record(out, cases)
    return str(subset)


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
    preview = _preview_settings(args)  # a bad setting stops here, before any work
    if args.cases_from:
        args.manifest = _listed_cases_manifest(args.manifest, args.cases_from, args.out)
    if not args.force:
        _refuse_if_it_cannot_fit(config if not isinstance(config, dict) else None, args.profile, overrides)
    with _owning(args.out, args.wait, "medddpm train"):
        path = train_medddpm(args.manifest, args.profile, args.out, config,
                             **({"preview": preview} if preview is not None else {}))
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
    import os

    from . import defaults
    from .synthesize import SynthesisConfig, synthesize_cohort

    splits = None if args.splits == "all" else tuple(args.splits.split(","))
    steps = args.steps
    if steps is None and args.sampler == "distilled":
        from .distill import student_steps_of

        steps = student_steps_of(args.checkpoint)
    config = SynthesisConfig(count=args.count, sampler=args.sampler, steps=steps or defaults.STEPS, seed=args.seed,
                             eta=args.eta,
                             spacing=args.spacing, analytic=args.analytic_variance, batch_size=args.batch_size,
                             splits=splits, max_retries=args.max_retries, num_threads=args.threads,
                             progress=not args.no_progress, device=args.device, shard=_shard(args.shard),
                             deterministic=args.deterministic)
    if not args.force:
        _refuse_sampling_if_it_cannot_fit(args.checkpoint, args.device, min(args.batch_size, args.count))
    shard = config.shard if config.shard != "auto" else (os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1"))
    with _owning(args.out, args.wait, "medddpm synthesize", f"shard-{shard[0]}-of-{shard[1]}" if shard else ""):
        path = synthesize_cohort(args.checkpoint, args.masks, args.out, config)
    print(f"manifest: {path}")
    return 0


def _refuse_if_it_cannot_fit(config, profile: str, overrides: dict) -> None:
    """ConfigError (one line: the prediction, the device's memory, the choices that fit) when the plan's memory
    model (synth.costs.memory_refusal) says a training step does not fit the device."""
    from core.device import autocast_dtype, resolve_device
    from core.errors import ConfigError

    from .checkpoint import adopt_init_network
    from .config import get_config
    from .costs import memory_refusal

    cfg = adopt_init_network(config or get_config(profile, **overrides))
    device = resolve_device(cfg.device)
    why = memory_refusal(cfg, device, train=True, half_precision=autocast_dtype(device, cfg.precision) is not None,
                         grad_checkpoint=cfg.grad_checkpoint)
    if why:
        raise ConfigError(why, kind="out-of-memory")


def _generator_config(checkpoint: str):
    """The MedDDPMConfig in a generator's metadata, without loading its weights; None for an unreadable generator
    (the run itself then names the file and the problem)."""
    import json

    from safetensors import safe_open

    from .checkpoint import resolve_generator
    from .config import MedDDPMConfig

    try:
        with safe_open(str(resolve_generator(checkpoint)), framework="pt") as f:
            return MedDDPMConfig.from_dict(json.loads((f.metadata() or {})["config"]))
    except Exception:
        return None


def _refuse_sampling_if_it_cannot_fit(checkpoint: str, device_name: str, batch: int) -> None:
    """As _refuse_if_it_cannot_fit, for one sampling network evaluation of ``batch`` volumes (fp32)."""
    from core.device import resolve_device
    from core.errors import ConfigError

    from .costs import memory_refusal

    cfg = _generator_config(checkpoint)
    if cfg is None:
        return
    why = memory_refusal(cfg, resolve_device(device_name), train=False, batch=batch)
    if why:
        raise ConfigError(why, kind="out-of-memory")


def _owning(out: str, wait: str | None, what: str, part: str = ""):
    """core.lock.folder_lock on ``out`` (``part``: a shard's own lock, so shards share a folder), except in a
    torchrun worker of `train --nproc`, whose launcher holds it."""
    import contextlib
    import os

    from core.lock import folder_lock, parse_wait

    if what == "medddpm train" and "LOCAL_RANK" in os.environ:
        return contextlib.nullcontext()
    return folder_lock(out, parse_wait(wait), what=what, name=part)


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


def _add_distill(subparsers) -> None:
    from core.device import DEVICE_HELP

    from .distill import DISTILL_LOSSES, STUDENT_STEPS, DistillConfig

    d = subparsers.add_parser(
        "distill", help="distil a trained generator into a 1-8-step student (progressive distillation)",
        description="Progressive distillation (Salimans & Ho 2022): halving rounds from the generator's DDIM "
                    "(eta 0) at --teacher-steps down to --steps, each student trained on the manifest's training "
                    "cases to make one DDIM step where its teacher makes two. Writes OUT/generator.safetensors (sample "
                    "it with `medddpm synthesize --sampler distilled`) and OUT/distill_card.json. Checkpointed; "
                    "rerunning the same command resumes (same bytes on the CPU).")
    d.add_argument("--checkpoint", required=True, help="the teacher: generator.safetensors (or its training folder; "
                                                       "trained or imported, ε or v prediction)")
    d.add_argument("--manifest", required=True, help="data_manifest.csv whose training rows the students learn on")
    d.add_argument("--steps", type=int, required=True, choices=STUDENT_STEPS, help="the student's sampling steps")
    d.add_argument("--out", required=True, help="output folder")
    d.add_argument("--teacher-steps", type=int, default=DistillConfig.teacher_steps,
                   help="the first teacher's DDIM steps, --steps times a power of two "
                        f"(default {DistillConfig.teacher_steps})")
    d.add_argument("--round-steps", type=int, default=DistillConfig.round_steps,
                   help=f"optimizer steps per halving round (default {DistillConfig.round_steps})")
    d.add_argument("--lr", type=float, default=DistillConfig.lr, help="Adam learning rate (cosine decay per round)")
    d.add_argument("--lr-min", type=float, default=DistillConfig.lr_min, help="learning rate each round ends at")
    d.add_argument("--warmup-steps", type=int, default=DistillConfig.warmup_steps,
                   help="linear learning-rate warm-up steps at the start of each round (default "
                        f"{DistillConfig.warmup_steps})")
    d.add_argument("--tumour-weight", type=float, default=DistillConfig.tumour_weight,
                   help="weight of a tumour voxel's squared error against the rest's, each sample's weights scaled "
                        f"to mean 1 (default {DistillConfig.tumour_weight}: the plain mean)")
    d.add_argument("--loss", default=DistillConfig.loss, choices=DISTILL_LOSSES,
                   help=f"l2: squared error (Salimans & Ho); l1: absolute error, whose students keep the background "
                        f"at -1 where l2's lift it (decisions/0019) (default {DistillConfig.loss})")
    d.add_argument("--clamp-aware", action="store_true",
                   help="where the teacher's target x0 lies on the clamp bound (air at -1), count only the student's "
                        "error inside the bound: the sampler clamps x0, so an error beyond it is none (decisions/0019)")
    d.add_argument("--batch-size", type=int, help="volumes per micro-batch (default: the teacher's)")
    d.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default: the teacher's)")
    d.add_argument("--ema-decay", type=float, default=DistillConfig.ema_decay, help="EMA decay of each student")
    d.add_argument("--seed", type=int, default=0, help="random seed")
    d.add_argument("--checkpoint-every", type=int, default=DistillConfig.checkpoint_every,
                   help="steps between checkpoints")
    d.add_argument("--threads", type=int, help="torch threads")
    d.add_argument("--device", default="auto", help=f"where to train: {DEVICE_HELP} (default auto)")
    d.add_argument("--deterministic", action="store_true", help="deterministic GPU kernels (slower)")
    d.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing of the student: much less memory at large grids for up to ~30 "
                        "%% more time per step, the same computation (the same student's bytes on the CPU); a run "
                        "may resume with or without it. Peaks: `medddpm plan --distill N [--grad-checkpoint]`")
    d.add_argument("--force", action="store_true", help="run even if the plan's memory model predicts that the "
                                                        "student's training step does not fit the device")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(func=_distill)


def _distill(args) -> int:
    from .distill import DistillConfig, distill_generator

    config = DistillConfig(steps=args.steps, teacher_steps=args.teacher_steps, round_steps=args.round_steps,
                           lr=args.lr, lr_min=args.lr_min, warmup_steps=args.warmup_steps,
                           tumour_weight=args.tumour_weight, loss=args.loss, clamp_aware=args.clamp_aware,
                           batch_size=args.batch_size,
                           grad_accum=args.grad_accum, ema_decay=args.ema_decay, seed=args.seed,
                           checkpoint_every=args.checkpoint_every,
                           num_threads=args.threads, progress=not args.no_progress, device=args.device,
                           deterministic=args.deterministic, grad_checkpoint=args.grad_checkpoint)
    if not args.force:
        _refuse_distillation_if_it_cannot_fit(args.checkpoint, config)
    print(f"student: {distill_generator(args.checkpoint, args.manifest, args.out, config)}")
    return 0


def _refuse_distillation_if_it_cannot_fit(checkpoint: str, config) -> None:
    """As _refuse_if_it_cannot_fit, for a round's student training step (fp32, checkpointed where
    --grad-checkpoint); the teacher's fp32 weights beside it are not counted (0.22 GiB at paper-brats)."""
    from core.device import resolve_device
    from core.errors import ConfigError

    from .checkpoint import resolve_generator
    from .costs import memory_refusal
    from .distill import round_config

    teacher_cfg = _generator_config(checkpoint)  # its metadata only: distill_generator loads the weights
    if teacher_cfg is None:
        return
    cfg = round_config(teacher_cfg, resolve_generator(checkpoint), config)
    why = memory_refusal(cfg, resolve_device(config.device), train=True, grad_checkpoint=config.grad_checkpoint,
                         fp32_only=True, step_name="a distillation step of the student")
    if why:
        raise ConfigError(why, kind="out-of-memory")

"""CLI verbs of flows/: `medddpm study` (the augment study, embedded: no separately started Prefect server),
`medddpm regenerate-cohort` and `medddpm plan` (the study's estimated cost, flows/costs.py). Prefect is imported
only when a verb runs, after its environment is set."""
from __future__ import annotations

import json
import os
from pathlib import Path


def prefect_env(study_dir: str | Path) -> None:
    """Embedded runs: keep Prefect's home (SQLite DB of the temporary API) inside the study folder unless the
    user chose one, and no telemetry. Must run before `import prefect`."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # the temporary API's first start migrates a fresh SQLite DB: 10 s here when idle, far more on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    if not os.environ.get("PREFECT_HOME") and not os.environ.get("PREFECT_API_URL"):
        home = Path(study_dir).resolve() / ".prefect" / "home"
        home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(home)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM -> SystemExit, so Prefect marks the run and stops its temporary API server on the way out instead
    of leaving it running (Python's default SIGTERM action skips all cleanup)."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def one_line_user_errors() -> None:
    """Prefect's console log prints a flow run's exception with its traceback; for the errors a user can cause
    (MedDDPMError: a bad file or setting, a busy folder) the message alone is kept there, since the CLI ends with
    it anyway (the API log, i.e. the UI, keeps the traceback). Call after Prefect is imported."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from core.errors import MedDDPMError

    class OneLine(logging.Formatter):
        def __init__(self, inner: logging.Formatter | None):
            super().__init__()
            self.inner = inner or logging.Formatter()

        def format(self, record):
            if not (record.exc_info and isinstance(record.exc_info[1], MedDDPMError)):
                return self.inner.format(record)
            saved = record.exc_info, record.exc_text
            record.exc_info = record.exc_text = None
            try:
                return self.inner.format(record)
            finally:
                record.exc_info, record.exc_text = saved

    for handler in logging.getLogger().handlers + logging.getLogger("prefect").handlers:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, OneLine):
            handler.setFormatter(OneLine(handler.formatter))


def read_params(path: str | None) -> dict:
    """Flow parameters from a JSON file (``--params``, ``--study-params``); {} without one."""
    if not path:
        return {}
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        from core.errors import InputError

        raise InputError(p, f"not a readable JSON parameter file ({e})", kind="unreadable") from e


def _csv(text: str | None, cast=str):
    return None if text is None else [cast(t.strip()) for t in text.split(",") if t.strip()]


def register(subparsers) -> None:
    from synth import defaults

    p = subparsers.add_parser(
        "study", help="run the augment study (Prefect flow augment-study) and build its report",
        description="Build (or reuse) the cohort, train Med-DDPM, synthesise what the mixes need, train one "
                    "segmenter per (mix, back end, seed), evaluate on the real test split and write STUDY/report/. "
                    "Runs the Prefect flow directly (no server needed); rerunning a finished study does no work, "
                    "a crashed one resumes. Options not given take the flow's defaults (docs/flows.md).")
    p.add_argument("--out", default="runs/default-study", help="study folder (default runs/default-study)")
    p.add_argument("--cohort", dest="cohort_manifest", help="real cohort data_manifest.csv "
                                                            "(default: build the embedded phantom cohort)")
    p.add_argument("--profile", help="cohort/model profile: tiny, demo (default), paper-brats, paper-wholehead")
    p.add_argument("--cases", dest="n_cases", type=int, help="phantom cohort size (default 48)")
    p.add_argument("--mixes", help="comma list of R:S[@real|@edited], default 1:0,0:1,1:2@edited; 'A>B' trains on A, "
                                   "then fine-tunes on B (0:1>1:0: synthetic pre-training, real fine-tuning)")
    p.add_argument("--n-real", type=int, help="real training cases per mix (data-scarce regime; default 8)")
    p.add_argument("--backends", help="comma list of segmenter back ends: monai, nnunet (default monai)")
    p.add_argument("--seeds", help="comma list of segmenter seeds (default 0,1,2)")
    p.add_argument("--network", choices=("segresnet", "dynunet"),
                   help="MONAI segmenter network (default: dynunet at demo; segresnet is 2x faster per step but "
                        "collapsed TC/ET on the phantom)")
    p.add_argument("--external-test", dest="external_test_manifest",
                   help="another real cohort (same profile) evaluated too, reported as its own test set")
    p.add_argument("--checkpoint", dest="medddpm_checkpoint", help="reuse this Med-DDPM checkpoint (no training)")
    p.add_argument("--cases-from", metavar="FILE",
                   help="a curated subset: use only the real cases listed in FILE (one case ID per line, '#' "
                        "comments; an ID the cohort lacks is an error); study.json records its sha256")
    p.add_argument("--medddpm-init", help="what Med-DDPM starts from: shipped (default: fine-tune the project's "
                                          "pre-trained generator of the profile, synth/shipped.py), scratch, or a "
                                          "generator file to fine-tune")
    p.add_argument("--sampler", help=f"synthesis sampler (default {defaults.SAMPLER}); distilled: --checkpoint is a "
                                     "student of `medddpm distill`, used as is (not fine-tuned) at its own steps")
    p.add_argument("--steps", dest="sampling_steps", type=int, help=f"sampling steps (default {defaults.STEPS}; "
                                                                     "with --sampler distilled the student's own, "
                                                                     "and with no --checkpoint which shipped student: "
                                                                     "demo ships 2 (default) and 4)")
    p.add_argument("--parallel", type=int, help="segmenter trainings at once in threads (default: at tiny/demo on "
                                                       "the CPU enough to keep every core busy, e.g. 3 for 9 "
                                                       "trainings on 2 cores; otherwise 2)")
    p.add_argument("--dask-address", help="run segmenter trainings on this Dask scheduler (tcp://host:8786)")
    p.add_argument("--dask-workers", type=int, help="run them on a local Dask cluster of N worker processes")
    p.add_argument("--device", help="where Med-DDPM, synthesis and segmenters run: auto (default: CUDA when present), "
                                    "cpu, cuda, cuda:N, mps")
    p.add_argument("--gpus", type=int, help="fan the segmenter trainings out one per GPU (Dask workers, each pinned "
                                            "to its GPU); with --dask-address the workers declare --resources GPU=1")
    p.add_argument("--preview-every", dest="medddpm_preview_every", type=int,
                   help="Med-DDPM training previews every N steps in OUT/medddpm/previews/ (default 0: none)")
    p.add_argument("--params", help="JSON file of flow parameters (options given on the command line win)")
    p.add_argument("--wait", help="if another run owns --out: wait this many seconds (or 'unlimited') for it to "
                                  "finish (default: stop at once, saying who owns it)")
    p.add_argument("--force", action="store_true", help="run even if the plan's memory model predicts that Med-DDPM "
                                                        "training or sampling does not fit this device's memory")
    p.set_defaults(func=_study)

    r = subparsers.add_parser(
        "regenerate-cohort", help="synthesise a new versioned synthetic cohort from a study's checkpoint",
        description="Prefect flow regenerate-cohort: new seeds, synth's quality gate, registered as regen-vNNN in "
                    "STUDY/synthetic/registry.json; --keep prunes the oldest regenerated cohorts no study used.")
    r.add_argument("--study", dest="study_dir", default="runs/default-study", help="study folder")
    r.add_argument("--count", type=int, help="cases (default one per conditioning mask)")
    r.add_argument("--checkpoint", help="Med-DDPM checkpoint (default: the one the study used)")
    r.add_argument("--masks", help="manifest of conditioning masks (default: the study's edited masks)")
    r.add_argument("--sampler", help=f"sampler (default {defaults.SAMPLER}; a distilled student's checkpoint: "
                                     "distilled, as its card says)")
    r.add_argument("--steps", type=int, help=f"sampling steps (default {defaults.STEPS}; a distilled student's own)")
    r.add_argument("--seed", type=int, help="sampling seed (default derived from the new version number)")
    r.add_argument("--keep", type=int, help="retention: newest regenerated cohorts kept (default all)")
    r.add_argument("--max-gate-failures", type=int, help="cases still failing the quality gate that are tolerated "
                                                         "(default 0: such a cohort is not registered)")
    r.add_argument("--device", help="where to sample: auto (default), cpu, cuda, cuda:N, mps")
    r.add_argument("--wait", help="if another run owns the study folder: wait this many seconds (or 'unlimited') "
                                  "for it to finish (default: stop at once, saying who owns it)")
    r.set_defaults(func=_regenerate)
    _register_plan(subparsers)


def _study(args) -> int:
    params = read_params(args.params)
    given = {k: getattr(args, k) for k in ("cohort_manifest", "profile", "n_cases", "n_real", "external_test_manifest",
                                           "medddpm_checkpoint", "medddpm_init", "sampler", "sampling_steps",
                                           "parallel", "dask_address", "dask_workers", "device", "gpus",
                                           "cases_from", "medddpm_preview_every")}
    given.update(mixes=_csv(args.mixes), backends=_csv(args.backends), seeds=_csv(args.seeds, int))
    params.update({k: v for k, v in given.items() if v is not None})
    if args.network:
        params["segmenter_config"] = {**params.get("segmenter_config", {}), "network": args.network}
    params["out"] = args.out
    from .plan import StudyParams, check_generator_choice

    check_generator_choice(StudyParams.pick(params))  # bad settings or generator: refused before the folder exists
    if not args.force:
        from .costs import study_memory_refusal

        study_memory_refusal(params.get("profile") or "demo", params.get("device"),
                             trains=not params.get("medddpm_checkpoint"), overrides=params.get("medddpm_config"))
    from core.lock import folder_lock, parse_wait

    with folder_lock(args.out, parse_wait(args.wait), what="medddpm study"):  # one run owns the study folder
        prefect_env(args.out)
        _exit_cleanly_on_sigterm()
        from .study import augment_study

        one_line_user_errors()
        result = augment_study(**params)
    print(f"report: {result['report']}\nper-case results: {result['per_case']}")
    return 0


def _regenerate(args) -> int:
    params = {k: getattr(args, k) for k in ("study_dir", "count", "checkpoint", "masks", "sampler", "steps", "seed",
                                            "keep", "max_gate_failures", "device") if getattr(args, k) is not None}
    from core.lock import folder_lock, parse_wait

    with folder_lock(args.study_dir, parse_wait(args.wait), what="medddpm regenerate-cohort"):
        prefect_env(args.study_dir)
        _exit_cleanly_on_sigterm()
        from .regenerate import regenerate_cohort

        one_line_user_errors()
        result = regenerate_cohort(**params)
    print(f"registered {result['cohort_id']}: {result['manifest']}" +
          (f"; pruned {', '.join(result['pruned'])}" if result["pruned"] else ""))
    return 0


def _register_plan(subparsers) -> None:
    from . import costs
    from .costs import CPU_TFLOPS, GPU_TFLOPS
    from .mixes import DEFAULT_MIXES

    paragraphs = costs.__doc__.split("\n\n")
    p = subparsers.add_parser(
        "plan", help="print the work of a study and its estimated accelerator hours and peak memory per stage",
        description=paragraphs[0] + " " + paragraphs[1].replace("\n", " "))
    p.add_argument("--profile", default="paper-brats", help="Med-DDPM profile (demo, paper-brats, paper-wholehead, "
                                                           "authors-brats, ...; default paper-brats)")
    p.add_argument("--cohort", help="real cohort data_manifest.csv: n_test = its real test rows "
                                    "(and --n-real defaults to its real training rows)")
    p.add_argument("--n-real", type=int, help="real training cases per mix (default: the cohort's, else 1000, "
                                              "the paper's)")
    p.add_argument("--n-test", type=int, default=0, help="real test cases (default: the cohort's)")
    p.add_argument("--mixes", default=",".join(DEFAULT_MIXES), help="comma list of R:S[@real|@edited] or A>B "
                                                                     "(pre-train on A, fine-tune on B: 0:1>1:0)")
    p.add_argument("--backends", default="nnunet", help="comma list: monai, nnunet (default nnunet)")
    p.add_argument("--seeds", type=int, default=3, help="segmenter seeds per mix (default 3)")
    p.add_argument("--medddpm-steps", type=int, help="Med-DDPM optimizer steps (default: the profile's)")
    p.add_argument("--sampling-steps", type=int, help="denoising steps per volume (default: synth's default)")
    p.add_argument("--distill", type=int, metavar="N", help="also distil the trained generator into an N-step student "
                                                           "(medddpm distill; N = 1, 2, 4, 8) and synthesise with "
                                                           "it; prints the distillation hours for every N")
    p.add_argument("--round-steps", type=int, help="with --distill: optimizer steps per halving round (default: "
                                                   "medddpm distill's)")
    p.add_argument("--teacher-steps", type=int, help="with --distill: the teacher's DDIM steps the rounds halve "
                                                     "(default: medddpm distill's)")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast (memory estimate)")
    p.add_argument("--grad-checkpoint", action="store_true", help="activation checkpointing (memory estimate): of "
                                                                  "the Med-DDPM training and, with --distill, of the "
                                                                  "student (medddpm distill --grad-checkpoint)")
    p.add_argument("--on", choices=("gpu", "cpu"), default="gpu", help="throughput default: gpu or cpu")
    p.add_argument("--tflops", type=float, help=f"sustained TFLOP/s (default {GPU_TFLOPS:g} on gpu, an assumption; "
                                                f"{CPU_TFLOPS:g} on cpu, measured)")
    p.add_argument("--detect", type=float, metavar="D", help="also print the seeds per mix and test cases needed to "
                                                             "detect a paired Dice difference of D (80 %% power, "
                                                             "α 0.05), with the hours each costs")
    p.add_argument("--variance-from", metavar="STUDY", help="with --detect: a finished study whose "
                                                            "results/per_case.csv gives the variance components "
                                                            "(default: the default study's seed sd, others assumed)")
    p.set_defaults(func=_plan)


def _plan(args) -> int:
    n_real, n_test = args.n_real, args.n_test
    if args.cohort:
        from cohort.manifest import load_manifest, select

        df = load_manifest(args.cohort)
        n_real = n_real or len(select(df, source="real", split="train"))
        n_test = n_test or len(select(df, source="real", split="test"))
    n_real = n_real or 1000
    from .costs import CPU_TFLOPS, GIB, GPU_TFLOPS, estimate_study_cost

    tflops = args.tflops or (GPU_TFLOPS if args.on == "gpu" else CPU_TFLOPS)
    half = args.on == "gpu" and not args.fp32  # precision auto: bf16 on a GPU, fp32 on a CPU
    stages = estimate_study_cost(args.profile, n_real, n_test, _csv(args.mixes), _csv(args.backends),
                                 list(range(args.seeds)), medddpm_steps=args.medddpm_steps,
                                 sampling_steps=args.sampling_steps, half_precision=half,
                                 grad_checkpoint=args.grad_checkpoint,
                                 device_type="cuda" if args.on == "gpu" else "cpu", distill=_distill_plan(args))
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
    if args.on == "gpu":
        from .costs import gpu_fit_table

        print("\nMed-DDPM on a GPU: predicted peak (synth.costs: PyTorch's MemTracker on fake tensors, CUDA's autocast "
              "policy, 1 GiB CUDA context) and the cards it fits")
        rows = gpu_fit_table(args.profile)
        cards = [k for k in rows[0] if k.endswith(" GB")]
        print(f"{'':<34} {'peak GiB':>9}  " + "  ".join(f"{c:>6}" for c in cards))
        for r in rows:
            print(f"{r['what']:<34} {r['peak_bytes'] / GIB:>9.1f}  " + "  ".join(
                f"{'fits' if r[c] else '-':>6}" for c in cards))
    if args.distill:
        print_distillation_plan(args, tflops, unit)
    if args.detect:
        from .costs import print_detection_plan

        print_detection_plan(args.detect, stages, args.seeds, n_test, tflops, unit, args.variance_from)
    return 0


def _distill_plan(args) -> dict | None:
    """estimate_study_cost's ``distill`` from `plan --distill N [--round-steps R] [--teacher-steps T]`; with
    --grad-checkpoint the student's training is counted checkpointed too (`medddpm distill --grad-checkpoint`)."""
    if not args.distill:
        if args.round_steps or args.teacher_steps:
            from core.errors import ConfigError

            raise ConfigError("--round-steps and --teacher-steps set a distillation: add --distill N")
        return None
    return {"steps": args.distill, "round_steps": args.round_steps, "teacher_steps": args.teacher_steps,
            "grad_checkpoint": args.grad_checkpoint}


def print_distillation_plan(args, tflops: float, unit: str) -> None:
    """`medddpm plan --distill N`: the hours of distilling the profile's generator into each student N (synth.distill's
    rounds and settings; flows.costs.distillation_table) and its network evaluations per volume vs DDPM-250; the
    peak memory of distilling in fp32 with and without activation checkpointing (flows.costs.distillation_cost),
    the plan's choice (--grad-checkpoint) first."""
    from synth import defaults
    from synth.costs import GPU_SIZES_GB

    from .costs import GIB, distillation_cost, distillation_table

    device_type = "cuda" if args.on == "gpu" else "cpu"
    rows = distillation_table(args.profile, tflops, teacher_steps=args.teacher_steps, round_steps=args.round_steps,
                              device_type=device_type)
    vs_default = f"vs {defaults.SAMPLER}-{defaults.STEPS}"
    peaks = []
    for ckpt in (args.grad_checkpoint, not args.grad_checkpoint):
        peak = distillation_cost(args.profile, args.distill, teacher_steps=args.teacher_steps,
                                 round_steps=args.round_steps, device_type=device_type,
                                 grad_checkpoint=ckpt).peak_bytes
        fits = ", ".join(f"{gb} GB" for gb in GPU_SIZES_GB if peak <= gb * 1e9) or "no card above"
        peaks.append(f"{peak / GIB:.1f} GiB {'with' if ckpt else 'without'} activation checkpointing "
                     f"({'`medddpm distill --grad-checkpoint`' if ckpt else 'the default'}"
                     f"{f'; fits {fits}' if args.on == 'gpu' else ''})")
    print(f"\nDistilling the {args.profile} generator (progressive distillation, medddpm distill): per round, round "
          "steps x (2 teacher evaluations without gradient + 1 student training step); the student trains in fp32 "
          "without TF32, so a GPU sustains less than a bf16 --tflops")
    print(f"peak memory of distilling (fp32): {peaks[0]}; {peaks[1]}; checkpointing recomputes the student's "
          "activations in its backward pass, time the hours below do not count")
    print(f"{'student steps':>13} {'rounds':>6} {unit + '-hours':>10} {'evaluations/volume':>18} {'vs DDPM-250':>11} "
          f"{vs_default:>11}")
    for r in rows:
        print(f"{r['student steps']:>13} {r['rounds']:>6} {r['hours']:>10.2f} {r['evaluations per volume']:>18} "
              f"{r['vs DDPM-250']:>10.1f}x {r[vs_default]:>10.2f}x")
    print(f"(network evaluations per synthesised volume, quality-gate redraws not counted: the {args.distill}-step "
          f"student {args.distill}, DDPM-250 250: {250 / args.distill:g}x fewer)")

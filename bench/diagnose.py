"""Diagnostics of a trained generator: one tool, one subcommand per question (each subcommand's --help says more).

    .venv/bin/python -m bench.diagnose generator      --generator G --work W     # samples, gate, MS-SSIM, montage
    .venv/bin/python -m bench.diagnose sdedit         --generator G --work W     # where the chain loses the anatomy
    .venv/bin/python -m bench.diagnose denoiser-by-t  --generator G --work W     # RMSE of x̂0 per noise level
    .venv/bin/python -m bench.diagnose trace-chain    --generator G --cohort C/data_manifest.csv   # x̂0 off the brain
    .venv/bin/python -m bench.diagnose sampler-quality --study S                 # few-step samplers on one mask
    .venv/bin/python -m bench.diagnose gate-pass-rate --work W                   # the quality gate, then and now

Where the probes need the default study's cases they take them from bench.harness (its phantom cohort under
W/cohort, its selected training cases); a network output becomes ε̂ / x̂0 through the library's
synth.schedulers.convert_model_output, as in sampling.
"""
from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import time
from pathlib import Path

from bench.harness import default_study_cohort, study_selection


def _network_output(model, x_t, cond, t: int):
    """The network's output at (x_t, t), one case at a time (batch 1, as the study samples), in x_t's dtype."""
    import torch

    from synth.schedulers import model_input

    with torch.no_grad():
        return torch.cat([model(model_input(x_t[i:i + 1].float(), cond[i:i + 1]), torch.tensor([t]))
                          for i in range(len(x_t))]).to(x_t.dtype)


def _slice_figure(rows, modalities, title: str, path: Path, dpi: int) -> None:
    """One row per (name, volume (C, X, Y, Z) tensor, axial index z, brain mask or None) and one column per modality;
    each image is windowed to its own 1-99 % inside the brain mask, or shown on [-1, 1] without one."""
    import numpy as np
    from matplotlib.figure import Figure

    from core.fsutil import atomic_path

    fig = Figure(figsize=(1.8 * len(modalities), 1.9 * len(rows)))
    axes = fig.subplots(len(rows), len(modalities), squeeze=False)
    for i, (name, vol, z, brain) in enumerate(rows):
        for j, m in enumerate(modalities):
            v = vol[j].numpy()
            lo, hi = np.percentile(v[brain], [1, 99]) if brain is not None else (-1, 1)
            axes[i, j].imshow(np.rot90(v[:, :, z]), cmap="gray", vmin=lo, vmax=hi)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            axes[i, j].set_title(m if i == 0 else "", fontsize=9)
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (1.9 * len(rows))))  # room for the title
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


# --- generator ----------------------------------------------------------------------------------------------------

def generator(args) -> int:
    """A quick look at a generator: 8 samples on the masks of the study's 8 selected cases, first-draw gate results
    and a montage.

        .venv/bin/python -m bench.diagnose generator --generator G --work W [--sampler ddim --steps 25 --eta 1
            --spacing leading] [--masks selected|test]

    Builds (or reuses) the default study's phantom cohort (48 cases, seed 0) under W/cohort, selects its 8 training
    cases as the study does (cohort.selection, seed 0), synthesises one case per mask with no redraws
    (synth.synthesize_cohort, max_retries=0), prints the gate pass rate and each failed check (also in
    W/<tag>/quality_report.csv), the mean MS-SSIM across masks of the 8 samples next to that of the 8 real images (the
    study's eval.synthesis.diversity with the same settings), the memorisation summary of the study's report
    (eval.memorisation: each sample's similarity to its mask's owner, to the mask alone, and the share beyond it), and
    writes W/montage_<tag>.png. The gate uses the intensity ranges beside G. --masks test takes the masks (and owners)
    of the cohort's first 8 test cases instead, which no study generator is fine-tuned on: the gap between the two
    owner similarities of a fine-tuned generator is what fine-tuning on the selected cases added. The lab notebook
    (docs/archive/benchmarks-2026-11-to-12.md, "Demo generator") used it on the pre-training checkpoints.
    """
    import pandas as pd

    from cohort.manifest import load_manifest, select, write_manifest
    from eval.memorisation import memorisation_table, summarise
    from eval.plots import plot_montage
    from eval.synthesis import diversity, ms_ssim_settings, read_cases
    from synth.synthesize import SynthesisConfig, synthesize_cohort

    work = Path(args.work)
    tag = args.tag or f"{args.sampler}_{args.steps}_{args.eta:g}_{args.spacing}"
    cohort = default_study_cohort(work)
    selected = study_selection(cohort)
    owners = selected
    if args.masks == "test":
        owners = cohort.parent / "test_first8.csv"  # beside the cohort's manifest: its relative paths stay valid
        write_manifest(select(load_manifest(cohort), source="real", split="test").sort_values("case_id").head(8),
                       owners)
        tag = tag if args.tag else f"{tag}_test"
    out = work / tag
    shutil.rmtree(out, ignore_errors=True)  # a probe is always a fresh draw
    t0 = time.perf_counter()
    manifest = synthesize_cohort(args.generator, owners, out, SynthesisConfig(
        count=8, sampler=args.sampler, steps=args.steps, seed=0, eta=args.eta, spacing=args.spacing, max_retries=0,
        num_threads=args.threads, progress=False, device="cpu", splits=None))
    seconds = (time.perf_counter() - t0) / 8
    passed = (load_manifest(manifest)["quality_gate"] == "pass").mean()
    print(f"{tag}: {seconds:.1f} s/volume, gate pass {passed:.2f}")
    report = pd.read_csv(out / "quality_report.csv")
    for row in report.itertuples():
        print(f"  {row.case_id}: {'pass' if row.passed else row.failures}")
    images = {name: [c.image for c in read_cases(m, source=src, progress=False)[1]]
              for name, m, src in (("synthetic", manifest, "synthetic"), ("real", owners, "real"))}
    settings = ms_ssim_settings(images["synthetic"][0].shape)
    across = {name: diversity([v.data for v in vols], None, settings=settings)["across"].mean()
              for name, vols in images.items()}
    print(f"MS-SSIM across masks: synthetic {across['synthetic']:.4f}, real {across['real']:.4f}")
    mem = summarise(memorisation_table(cohort, manifest, synthetic_id=tag, train_ids=load_manifest(selected)["case_id"],
                                       progress=False)).iloc[0]
    print(f"memorisation (the study's table): owner similarity median {mem.owner_similarity_median:.3f}, mask alone "
          f"{mem.mask_similarity_median:.3f}, above the painted mask {mem.frac_above_painted_mask:.2f}")
    plot_montage(cohort, manifest, work / f"montage_{tag}.png")
    return 0


def _generator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", required=True, help="generator.safetensors (intensity_ranges.json beside it)")
    p.add_argument("--work", required=True)
    p.add_argument("--tag", default=None, help="name of this probe's output folder (default: from the sampler)")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--spacing", default="leading")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--masks", choices=("selected", "test"), default="selected",
                   help="the study's 8 selected training cases (default) or the cohort's first 8 test cases")


# --- sdedit -------------------------------------------------------------------------------------------------------

def sdedit(args) -> int:
    """Where along the sampling chain does a generator lose the anatomy? Start its chain from real images noised to t0.

        .venv/bin/python -m bench.diagnose sdedit --generator G --work W [--start 249,199,149,99,49] [--eta 1
            --steps 25] [--figure sdedit.png]

    On the 8 cases the default study selects from its phantom cohort (48 cases, seed 0; built under W/cohort as the
    generator subcommand does) each real image is noised to timestep t0 with the training forward process (fixed
    noise, seed 0) and the generator's DDIM chain (the study's sampler: 25 leading steps, eta 1) runs from t0 down on
    the case's own mask, through the chain's timesteps below t0 (SDEdit, Meng et al. 2022). The real anatomy is
    in x_t0; what the chain keeps of it says from which noise level on the network keeps anatomy it is given, and
    where it has to lay the anatomy down itself and fails. Prints, per t0, the correlation inside the brain between
    each result and its real image (eval.memorisation.brain_correlation, the study's owner similarity); --figure draws
    the first two cases (axial slice through the tumour, each image windowed to its own 1-99 % inside the brain, as the
    study's montage). The chain is the library's (synth.schedulers.run_sampler with start_t). The lab notebook
    (docs/archive/benchmarks-2026-11-to-12.md, "Where the chain loses the anatomy") used it on the v3 generator.
    """
    import math

    import numpy as np
    import torch

    from cohort.manifest import load_manifest
    from eval.memorisation import brain_correlation
    from synth.checkpoint import load_generator
    from synth.data import load_items
    from synth.schedulers import eps_from_output, make_sampler, run_sampler

    torch.set_num_threads(args.threads)
    selected = study_selection(default_study_cohort(args.work))
    model, cfg, _ = load_generator(args.generator)
    model.eval()
    items = load_items(selected, cfg, load_manifest(selected))
    x0 = torch.stack([it["image"] for it in items]).double()
    cond = torch.stack([it["condition"] for it in items])
    brain = (cond.sum(1) > 0).numpy()
    sampler = make_sampler("ddim", cfg.timesteps, cfg.schedule, eta=args.eta)
    alpha_bar = sampler.schedule.alpha_bar
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def eps_hat(x, t):  # ε̂ per case, from either parameterisation
        return eps_from_output(_network_output(model, x, cond, t), x, alpha_bar(t), cfg.prediction)

    results = {}
    print(f"{'t0':>4}  {'SNR':>8}  correlation with the real image inside the brain (8 cases): median  mean")
    for t0 in [int(t) for t in args.start.split(",")]:
        a0 = alpha_bar(t0)
        x = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * noise
        g = torch.Generator().manual_seed(1)
        x = run_sampler(eps_hat, x, sampler, args.steps,
                        lambda g=g: torch.randn(x0.shape, generator=g, dtype=torch.float64), start_t=t0)
        x = x.clamp(-1, 1)
        r = [brain_correlation(x[i].numpy(), x0[i].numpy(), brain[i]) for i in range(len(x))]
        results[t0] = x
        print(f"{t0:>4}  {a0 / (1 - a0):>8.2g}  {np.median(r):.3f}  {np.mean(r):.3f}", flush=True)
    if args.figure:
        from eval.plots import tumour_slice

        rows = []
        for c in (0, 1):
            z = tumour_slice(np.asarray(items[c]["label"]).squeeze())
            rows.append((f"case {c}: real", x0[c], z, brain[c]))
            rows += [(f"case {c}: from t0={t0}", out[c], z, brain[c]) for t0, out in results.items()]
        _slice_figure(rows, cfg.modalities, "SDEdit: real images noised to t0, then the generator's chain (axial "
                      "slice through the tumour)", Path(args.figure), dpi=80)
        print(f"wrote {args.figure}")
    return 0


def _sdedit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--start", default="249,199,149,99,49", help="the timesteps t0 the chains start from")
    p.add_argument("--steps", type=int, default=25, help="steps of the full chain (t0 joins its timesteps below t0)")
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--figure", help="write the first two cases' results to this PNG")


# --- denoiser-by-t ------------------------------------------------------------------------------------------------

def denoiser_by_t(args) -> int:
    """How well a generator predicts the clean image at each noise level: RMSE of x̂0 inside the brain, per timestep.

        .venv/bin/python -m bench.diagnose denoiser-by-t --generator G [G2 ...] --work W
            [--timesteps 249,199,149,99,49,9] [--figure x0hat.png]

    On the 8 cases the default study selects from its phantom cohort (48 cases, seed 0; built under W/cohort as the
    generator subcommand does) it noises each image to timestep t with fixed noise (seed 0), asks the network for
    x̂0 (ε- or v-prediction alike) and prints the RMSE inside the head (voxels above the image's minimum in any
    modality) next to two baselines that need no network: the voxelwise mean of the 8 images (what a denoiser that
    ignores x_t could reach without the mask) and x_t itself (what a denoiser that ignores the noise reaches at small
    t). A generator whose x̂0 at high t is no better than the mean image has not learned the anatomy its samples are
    drawn from (docs/decisions/0002-min-snr-weighting-with-a-floor.md). --figure also draws x̂0 of the first case at
    each t (axial slice through its tumour, four modalities, one block of rows per generator, all on the [-1, 1]
    scale): noise the network passes through shows as speckle there, where the RMSE only says "worse".
    --cases M --split S --n N uses the first N real cases of split S of manifest M instead (no --work): run once
    with the pre-training cohort's training cases and once with its test cases, a generator that fits the cases it
    was trained on better than unseen ones shows a gap between the two.
    """
    import numpy as np
    import torch

    from cohort.manifest import load_manifest, select
    from synth.checkpoint import load_generator
    from synth.data import load_items
    from synth.schedulers import convert_model_output, make_training_scheduler

    torch.set_num_threads(args.threads)
    if args.cases:
        manifest = args.cases
        rows = select(load_manifest(manifest), source="real", split=args.split).iloc[:args.n]
    elif args.work:
        manifest = study_selection(default_study_cohort(args.work))
        rows = load_manifest(manifest)
    else:
        args.parser.error("give --work (the study's 8 selected cases) or --cases")
    ts = [int(t) for t in args.timesteps.split(",")]
    items = None  # read with the first generator's config
    names = [Path(g).parent.name if Path(g).name == "generator.safetensors" else Path(g).stem for g in args.generator]
    print("t      " + "  ".join(f"{n[:20]:>20}" for n in names) + "      mean-image    x_t")
    results, first_case = {}, {}
    for gen in args.generator:
        model, cfg, _ = load_generator(gen)
        if items is None:
            items = load_items(manifest, cfg, rows)
            x0 = torch.stack([it["image"] for it in items])
            cond = torch.stack([it["condition"] for it in items])
            brain = (x0 > x0.amin(dim=(2, 3, 4), keepdim=True) + 1e-3).any(1, keepdim=True)
            mean_image = x0.mean(0, keepdim=True).expand_as(x0)
            sched = make_training_scheduler(cfg.timesteps, cfg.schedule)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        for t in ts:
            xt = sched.add_noise(x0, noise, torch.full((len(x0),), t, dtype=torch.long))
            out = _network_output(model, xt, cond, t)
            x0_hat = convert_model_output(out, xt, float(sched.alphas_cumprod[t]), cfg.prediction)[1].clamp(-1, 1)
            results[(gen, t)] = _rmse(x0_hat, x0, brain)
            first_case[(gen, t)] = x0_hat[0]
    for t in ts:  # the baselines need no network: once per t
        xt = sched.add_noise(x0, noise, torch.full((len(x0),), t, dtype=torch.long))
        print(f"{t:<6} " + "  ".join(f"{results[(g, t)]:>20.3f}" for g in args.generator)
              + f"  {_rmse(mean_image, x0, brain):>14.3f}  {_rmse(xt, x0, brain):>6.3f}")
    if args.figure:
        from eval.plots import tumour_slice

        z = tumour_slice(np.asarray(items[0]["label"]).squeeze())
        rows_img = [("real", x0[0], z, None)] + [(f"{n[:20]} t={t}", first_case[(g, t)], z, None)
                                                 for g, n in zip(args.generator, names) for t in ts]
        _slice_figure(rows_img, cfg.modalities, f"x̂0 of the first selected case, axial slice z={z}, [-1, 1]",
                      Path(args.figure), dpi=90)
        print(f"wrote {args.figure}")
    return 0


def _rmse(a, b, brain) -> float:
    d = (a - b)[brain.expand_as(b)]
    return float(d.pow(2).mean().sqrt())


def _denoiser_by_t_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", nargs="+", required=True)
    p.add_argument("--work", help="folder for the study's phantom cohort (not needed with --cases)")
    p.add_argument("--cases", help="data_manifest.csv to take the cases from instead of the study's 8 selected ones, "
                                   "e.g. the pre-training cohort's, to compare its training and test cases")
    p.add_argument("--split", default="train", help="with --cases: the split whose real cases are used")
    p.add_argument("--n", type=int, default=16, help="with --cases: how many of them (the first in the manifest)")
    p.add_argument("--timesteps", default="249,199,149,99,49,9")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--figure", help="also write x̂0 of the first case at each t to this PNG")


# --- trace-chain --------------------------------------------------------------------------------------------------

def trace_chain(args) -> int:
    """Where does a generator's sample go wrong? Its x̂0 on forward-noised real images vs inside the sampling chain.

        .venv/bin/python -m bench.diagnose trace-chain --generator G --cohort C/data_manifest.csv [--sampler ddim
            --steps 25 --eta 1]

    For the first real test case of the cohort: (a) the case noised with the training forward process at a few
    timesteps, and the network's x̂0 there; (b) one sampling run on the case's mask, logging x̂0 at every step. Prints
    the mean of x̂0 outside the brain per modality (real: -1). docs/decisions/0001-v-prediction.md used it on an
    ε-prediction generator to find that the first step's x̂0 stayed wrong to the end.
    """
    import math

    import torch

    from synth.checkpoint import load_generator
    from synth.data import load_items, training_rows
    from synth.schedulers import convert_model_output, make_sampler, make_training_scheduler, run_sampler

    torch.set_num_threads(args.threads)
    model, cfg, _ = load_generator(args.generator)
    item = load_items(args.cohort, cfg, training_rows(args.cohort, cfg, splits=("test",)).iloc[:1])[0]
    x0, cond = item["image"][None], item["condition"][None]
    background = cond[0].sum(0) == 0  # no condition channel set: outside the brain
    sampler = make_sampler(args.sampler, cfg.timesteps, cfg.schedule, eta=args.eta)

    def eps_and_x0(x_t, t):
        return convert_model_output(_network_output(model, x_t, cond, t), x_t, sampler.schedule.alpha_bar(t),
                                    cfg.prediction)

    def bg(x):
        return " ".join(f"{float(v):+.3f}" for v in x[0][:, background].mean(1))

    print(f"(a) forward-noised real case, x̂0 mean outside the brain per modality {list(cfg.modalities)}")
    sched = make_training_scheduler(cfg.timesteps, cfg.schedule)
    g = torch.Generator().manual_seed(0)
    for t in (10, 50, 100, 200, cfg.timesteps - 1):
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), torch.tensor([t])).double()
        print(f"  t={t:3d} sqrt(abar)={math.sqrt(sampler.schedule.alpha_bar(t)):.1e}  {bg(eps_and_x0(x_t, t)[1])}")

    print(f"(b) inside the chain ({sampler.label()}, {args.steps} steps), x̂0 clamped as the samplers do")

    def denoise(x_t, t):
        eps, x0h = eps_and_x0(x_t.double(), t)
        print(f"  t={t:3d}  {bg(x0h.clamp(-1, 1))}")
        return eps

    x = torch.randn(x0.shape, generator=g).double()
    out = run_sampler(denoise, x, sampler, args.steps, lambda: torch.randn(x.shape, generator=g).double())
    print(f"  final {bg(out.clamp(-1, 1))}")
    return 0


def _trace_chain_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--generator", required=True)
    p.add_argument("--cohort", required=True)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)


# --- sampler-quality ----------------------------------------------------------------------------------------------

SAMPLER_QUALITY_RUNS = [("ddpm", 250, 0.0), ("ddim", 25, 0.0), ("ddim", 50, 0.0), ("dpmpp2m", 25, 0.0),
                        ("dpmpp2m", 50, 0.0), ("ddim", 25, 1.0), ("ddim", 50, 1.0)]


def sampler_quality(args) -> int:
    """Sample quality of few-step samplers vs 250-step DDPM on a trained generator (ratios in one run).

        .venv/bin/python -m bench.diagnose sampler-quality --study runs/bench-study2 [--case 0]

    For one training mask: seconds per volume, voxel correlation with the real image that owns the mask, and the mean
    outside the brain (the real value is -1). Results: docs/decisions/0004-sampler-default.md.
    """
    import numpy as np
    import torch

    from synth.checkpoint import load_generator
    from synth.data import load_items, training_rows
    from synth.schedulers import make_sampler, sample

    torch.set_num_threads(2)
    study = Path(args.study)
    model, cfg, _ = load_generator(study / "medddpm")
    manifest = next((study / "cohort").glob("train_n*_seed*.csv"))
    item = load_items(manifest, cfg, training_rows(manifest, cfg).iloc[[args.case]])[0]
    real = item["image"].numpy()
    brain = real[0] > -0.99
    base = None
    for name, steps, eta in SAMPLER_QUALITY_RUNS:
        t0 = time.perf_counter()
        x = sample(model, make_sampler(name, eta=eta), item["condition"][None], real.shape[0], steps, [0],
                   prediction=cfg.prediction)[0].numpy()
        dt = time.perf_counter() - t0
        base = base or dt
        corr = np.corrcoef(x.ravel(), real.ravel())[0, 1]
        print(f"{name:8s} steps={steps:3d} eta={eta:g}  {dt:6.1f} s ({base / dt:4.1f}x DDPM-250)  "
              f"corr={corr:.3f}  bg_mean={x[:, ~brain].mean():.2f}")
    return 0


def _sampler_quality_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study folder with medddpm/ and cohort/train_n*_seed*.csv")
    p.add_argument("--case", type=int, default=0, help="index of the training mask to condition on")


# --- gate-pass-rate -----------------------------------------------------------------------------------------------

def first_gate_failures(image, label, stats, modalities, margin=0.05):
    """The gate before 2026-12 (median per label within the training cases' [min, max] +- margin)."""
    import numpy as np

    out = []
    for v in np.unique(label).tolist():
        sel = label == v
        if v not in (1, 2, 3, 4) or sel.sum() < 5 or str(v) not in stats["labels"]:
            continue
        for ci, m in enumerate(modalities):
            s = stats["labels"][str(v)].get(m)
            if s and not s["min"] - margin <= float(np.median(image[ci][sel])) <= s["max"] + margin:
                out.append(f"{v}/{m}")
    return out


def gate_pass_rate(args) -> int:
    """Quality-gate pass rate of samples of a demo generator trained from scratch on the default study's cases (as
    `make study` trained it before the project shipped a pre-trained generator): the phantom-v1 demo cohort, its 8
    real training cases the study selects (seed 0), the demo recipe; then samples on the masks of its training
    cases with the default sampler, judged by the gate (first draw only, no redraws) and, for comparison, by the
    first gate (per-label median inside the training [min, max] +- 0.05).

        .venv/bin/python -m bench.diagnose gate-pass-rate --work runs/bench-gate
    """
    import numpy as np
    import pandas as pd
    import torch

    from synth import defaults
    from synth.checkpoint import RANGES_FILE, load_generator
    from synth.data import load_items, training_rows
    from synth.quality import check_sample, load_ranges
    from synth.schedulers import make_sampler, sample
    from synth.train import train_medddpm

    work = Path(args.work)
    selected = study_selection(default_study_cohort(work, progress=False), args.n_real)
    gen = train_medddpm(selected, "demo", work / "medddpm", {"num_threads": args.threads, "progress": False})
    model, cfg, _ = load_generator(gen)
    stats = load_ranges(gen.parent / RANGES_FILE)
    items = load_items(selected, cfg, training_rows(selected, cfg))
    sampler = make_sampler(defaults.SAMPLER, eta=defaults.ETA)
    rows = []
    torch.set_num_threads(args.threads)
    for i, it in enumerate(items):
        lab = np.asarray(it["label"])[0]
        cond = it["condition"][None].repeat(args.samples_per_mask, 1, 1, 1, 1)
        x = sample(model, sampler, cond, cfg.out_channels, defaults.STEPS,
                   [1000 * i + k for k in range(args.samples_per_mask)], prediction=cfg.prediction).numpy()
        for k in range(len(x)):
            new = check_sample(x[k], lab, stats, cfg.modalities)
            rows.append({"case": it["case_id"], "new_gate_pass": not new, "first_gate_pass":
                         not first_gate_failures(x[k], lab, stats, cfg.modalities),
                         "new_failures": "; ".join(new)})
    df = pd.DataFrame(rows)
    print(f"{len(df)} samples ({defaults.SAMPLER}, {defaults.STEPS} steps, eta {defaults.ETA:g}) of the demo "
          f"generator trained on {args.n_real} phantom cases")
    print(f"first gate (median in [min, max] +- 0.05): pass rate {df['first_gate_pass'].mean():.1%}")
    print(f"gate (median/background/texture envelopes): pass rate {df['new_gate_pass'].mean():.1%}")
    checks = pd.Series([f.split(":")[0] for s in df["new_failures"] for f in s.split("; ") if f])
    print("failed checks:", checks.str.split(" ").str[0].value_counts().to_dict())
    print(checks.value_counts().head(8).to_string())
    return 0


def _gate_pass_rate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", required=True)
    p.add_argument("--n-real", type=int, default=8)
    p.add_argument("--samples-per-mask", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)


# subcommand -> (what it runs, its arguments)
SUBCOMMANDS = {"generator": (generator, _generator_args), "sdedit": (sdedit, _sdedit_args),
               "denoiser-by-t": (denoiser_by_t, _denoiser_by_t_args), "trace-chain": (trace_chain, _trace_chain_args),
               "sampler-quality": (sampler_quality, _sampler_quality_args),
               "gate-pass-rate": (gate_pass_rate, _gate_pass_rate_args)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="subcommand", required=True)
    for name, (run, add_arguments) in SUBCOMMANDS.items():
        doc = inspect.cleandoc(run.__doc__)
        p = sub.add_parser(name, help=doc.split("\n\n")[0], description=doc,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
        p.set_defaults(run=run, parser=p)
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())

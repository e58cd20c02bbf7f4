"""How well a generator predicts the clean image at each noise level: RMSE of x̂0 inside the brain, per timestep.

    .venv/bin/python bench/probe_denoiser_by_t.py --generator G [G2 ...] --work W [--timesteps 249,199,149,99,49,9]
        [--figure x0hat.png]

On the 8 cases the default study selects from its phantom cohort (48 cases, seed 0; built under W/cohort as
bench/probe_generator.py does) it noises each image to timestep t with fixed noise (seed 0), asks the network for
x̂0 (ε- or v-prediction alike) and prints the RMSE inside the head (voxels above the image's minimum in any
modality) next to
two baselines that need no network: the voxelwise mean of the 8 images (what a denoiser that ignores x_t could
reach without the mask) and x_t itself (what a denoiser that ignores the noise reaches at small t). A generator
whose x̂0 at high t is no better than the mean image has not learned the anatomy its samples are drawn from
(docs/benchmarks.md, "Demo generator"). --figure also draws x̂0 of the first case at each t (axial slice through its
tumour, four modalities, one block of rows per generator, all on the [-1, 1] scale): noise the network passes through
shows as speckle there, where the RMSE only says "worse". --cases M --split S --n N uses the first N real cases of
split S of manifest M instead (no --work): run once with the pre-training cohort's training cases and once with its
test cases, a generator that fits the cases it was trained on better than unseen ones shows a gap between the two.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", nargs="+", required=True)
    ap.add_argument("--work", help="folder for the study's phantom cohort (not needed with --cases)")
    ap.add_argument("--cases", help="data_manifest.csv to take the cases from instead of the study's 8 selected ones, "
                                    "e.g. the pre-training cohort's, to compare its training and test cases")
    ap.add_argument("--split", default="train", help="with --cases: the split whose real cases are used")
    ap.add_argument("--n", type=int, default=16, help="with --cases: how many of them (the first in the manifest)")
    ap.add_argument("--timesteps", default="249,199,149,99,49,9")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--figure", help="also write x̂0 of the first case at each t to this PNG")
    args = ap.parse_args(argv)

    import torch

    from cohort.manifest import load_manifest, select
    from cohort.phantom import build_phantom_cohort
    from cohort.selection import write_training_selection
    from synth.checkpoint import load_generator
    from synth.data import load_items
    from synth.schedulers import make_training_scheduler, model_input

    torch.set_num_threads(args.threads)
    if args.cases:
        manifest = args.cases
        rows = select(load_manifest(manifest), source="real", split=args.split).iloc[:args.n]
    elif args.work:
        cohort = build_phantom_cohort(Path(args.work) / "cohort", n_cases=48, seed=0, profile="demo")
        manifest = write_training_selection(cohort, 8, 0)
        rows = load_manifest(manifest)
    else:
        ap.error("give --work (the study's 8 selected cases) or --cases")
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
            tt = torch.full((len(x0),), t, dtype=torch.long)
            xt = sched.add_noise(x0, noise, tt)
            a = float(sched.alphas_cumprod[t])
            with torch.no_grad():
                out = torch.cat([model(model_input(xt[i:i + 1], cond[i:i + 1]), tt[i:i + 1]) for i in range(len(x0))])
            x0_hat = ((xt - (1 - a) ** 0.5 * out) / a ** 0.5 if cfg.prediction == "epsilon"
                      else a ** 0.5 * xt - (1 - a) ** 0.5 * out).clamp(-1, 1)
            results[(gen, t)] = _rmse(x0_hat, x0, brain)
            first_case[(gen, t)] = x0_hat[0]
    for t in ts:  # the baselines need no network: once per t
        xt = sched.add_noise(x0, noise, torch.full((len(x0),), t, dtype=torch.long))
        print(f"{t:<6} " + "  ".join(f"{results[(g, t)]:>20.3f}" for g in args.generator)
              + f"  {_rmse(mean_image, x0, brain):>14.3f}  {_rmse(xt, x0, brain):>6.3f}")
    if args.figure:
        rows_img = [("real", x0[0])] + [(f"{n[:20]} t={t}", first_case[(g, t)])
                                         for g, n in zip(args.generator, names) for t in ts]
        _figure(rows_img, items[0]["label"], cfg.modalities, Path(args.figure))
        print(f"wrote {args.figure}")
    return 0


def _figure(rows, label, modalities, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from eval.plots import tumour_slice

    z = tumour_slice(np.asarray(label).squeeze())
    fig, axes = plt.subplots(len(rows), len(modalities), figsize=(1.8 * len(modalities), 1.9 * len(rows)),
                             squeeze=False)
    for i, (name, vol) in enumerate(rows):
        for j, m in enumerate(modalities):
            ax = axes[i, j]
            ax.imshow(np.rot90(vol[j, :, :, z].numpy()), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(m if i == 0 else "", fontsize=9)
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.suptitle(f"x̂0 of the first selected case, axial slice z={z}, [-1, 1]", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _rmse(a, b, brain) -> float:
    d = (a - b)[brain.expand_as(b)]
    return float(d.pow(2).mean().sqrt())


if __name__ == "__main__":
    sys.exit(main())

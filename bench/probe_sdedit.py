"""Where along the sampling chain does a generator lose the anatomy? Start its chain from real images noised to t0.

    .venv/bin/python bench/probe_sdedit.py --generator G --work W [--start 249,199,149,99,49] [--eta 1 --steps 25]
        [--figure sdedit.png]

On the 8 cases the default study selects from its phantom cohort (48 cases, seed 0; built under W/cohort as
bench/probe_generator.py does) each real image is noised to timestep t0 with the training forward process (fixed
noise, seed 0) and the generator's DDIM chain (the study's sampler: 25 leading steps, eta 1) runs from t0 down on
the case's own mask, through the chain's timesteps below t0 (SDEdit, Meng et al. 2022). The real anatomy is
in x_t0; what the chain keeps of it says from which noise level on the network keeps anatomy it is given, and
where it has to lay the anatomy down itself and fails. Prints, per t0, the correlation inside the brain between
each result and its real image (eval.memorisation.brain_correlation, the study's owner similarity); --figure draws
the first two cases (axial slice through the tumour, each image windowed to its own 1-99 % inside the brain, as the
study's montage). The chain is the library's (synth.schedulers.run_sampler with start_t). docs/benchmarks.md
("Where the chain loses the anatomy") used it on the v3 generator.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--start", default="249,199,149,99,49", help="the timesteps t0 the chains start from")
    ap.add_argument("--steps", type=int, default=25, help="steps of the full chain (t0 joins its timesteps below t0)")
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--figure", help="write the first two cases' results to this PNG")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    from cohort.manifest import load_manifest
    from cohort.phantom import build_phantom_cohort
    from cohort.selection import write_training_selection
    from eval.memorisation import brain_correlation
    from synth.checkpoint import load_generator
    from synth.data import load_items
    from synth.schedulers import make_sampler, model_input, run_sampler

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    cohort = build_phantom_cohort(work / "cohort", n_cases=48, seed=0, profile="demo")
    selected = write_training_selection(cohort, 8, 0)
    model, cfg, _ = load_generator(args.generator)
    model.eval()
    items = load_items(selected, cfg, load_manifest(selected))
    x0 = torch.stack([it["image"] for it in items]).double()
    cond = torch.stack([it["condition"] for it in items])
    brain = (cond.sum(1) > 0).numpy()
    sampler = make_sampler("ddim", cfg.timesteps, cfg.schedule, eta=args.eta)
    alpha_bar = sampler.schedule.alpha_bar
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def eps_hat(x, t):  # ε̂ per case (batch 1, as the study samples), from either parameterisation
        with torch.no_grad():
            out = torch.cat([model(model_input(x[i:i + 1].float(), cond[i:i + 1]), torch.tensor([t]))
                             for i in range(len(x))]).double()
        a = alpha_bar(t)
        return math.sqrt(a) * out + math.sqrt(1 - a) * x if cfg.prediction == "v" else out

    results = {}
    print(f"{'t0':>4}  {'SNR':>8}  correlation with the real image inside the brain (8 cases): median  mean")
    for t0 in [int(t) for t in args.start.split(",")]:
        a0 = alpha_bar(t0)
        x = math.sqrt(a0) * x0 + math.sqrt(1 - a0) * noise
        g = torch.Generator().manual_seed(1)
        x = run_sampler(eps_hat, x, sampler, args.steps,
                        lambda: torch.randn(x0.shape, generator=g, dtype=torch.float64), start_t=t0)
        x = x.clamp(-1, 1)
        r = [brain_correlation(x[i].numpy(), x0[i].numpy(), brain[i]) for i in range(len(x))]
        results[t0] = x
        print(f"{t0:>4}  {a0 / (1 - a0):>8.2g}  {np.median(r):.3f}  {np.mean(r):.3f}", flush=True)
    if args.figure:
        _figure(x0, results, items, brain, cfg.modalities, Path(args.figure))
        print(f"wrote {args.figure}")
    return 0


def _figure(x0, results, items, brain, modalities, path: Path) -> None:
    import numpy as np
    from matplotlib.figure import Figure

    from core.fsutil import atomic_path
    from eval.plots import tumour_slice

    rows = []
    for c in (0, 1):
        rows.append((f"case {c}: real", c, x0[c]))
        rows += [(f"case {c}: from t0={t0}", c, out[c]) for t0, out in results.items()]
    fig = Figure(figsize=(1.8 * len(modalities), 1.9 * len(rows)))
    axes = fig.subplots(len(rows), len(modalities), squeeze=False)
    for i, (name, c, vol) in enumerate(rows):
        z = tumour_slice(np.asarray(items[c]["label"]).squeeze())
        for j, m in enumerate(modalities):
            v = vol[j].numpy()
            lo, hi = np.percentile(v[brain[c]], [1, 99])
            axes[i, j].imshow(np.rot90(v[:, :, z]), cmap="gray", vmin=lo, vmax=hi)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            axes[i, j].set_title(m if i == 0 else "", fontsize=9)
        axes[i, 0].set_ylabel(name, fontsize=7)
    fig.suptitle("SDEdit: real images noised to t0, then the generator's chain (axial slice through the tumour)",
                 fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / (1.9 * len(rows))))  # room for the title
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


if __name__ == "__main__":
    sys.exit(main())

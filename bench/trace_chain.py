"""Where does a generator's sample go wrong? Its x̂0 on forward-noised real images vs inside the sampling chain.

    .venv/bin/python bench/trace_chain.py --generator G --cohort C/data_manifest.csv [--sampler ddim --steps 25 --eta 1]

For the first real test case of the cohort: (a) the case noised with the training forward process at a few
timesteps, and the network's x̂0 there; (b) one sampling run on the case's mask, logging x̂0 at every step. Prints
the mean of x̂0 outside the brain per modality (real: -1). docs/benchmarks.md ("Demo generator") used it on an
ε-prediction generator to find that the first step's x̂0 stayed wrong to the end.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--cohort", required=True)
    ap.add_argument("--sampler", default="ddim")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    from synth.checkpoint import load_generator
    from synth.data import load_items, training_rows
    from synth.schedulers import make_sampler, make_training_scheduler, model_input, run_sampler

    torch.set_num_threads(args.threads)
    model, cfg, _ = load_generator(args.generator)
    item = load_items(args.cohort, cfg, training_rows(args.cohort, cfg, splits=("test",)).iloc[:1])[0]
    x0, cond = item["image"][None], item["condition"][None]
    background = cond[0].sum(0) == 0  # no condition channel set: outside the brain
    sampler = make_sampler(args.sampler, cfg.timesteps, cfg.schedule, eta=args.eta)

    def x0_hat(x_t, t):
        with torch.no_grad():
            out = model(model_input(x_t.float(), cond), torch.tensor([t])).double()
        a = sampler.schedule.alpha_bar(t)
        if cfg.prediction == "v":
            return math.sqrt(a) * x_t - math.sqrt(1 - a) * out, math.sqrt(a) * out + math.sqrt(1 - a) * x_t
        return (x_t - math.sqrt(1 - a) * out) / math.sqrt(a), out

    def bg(x):
        return " ".join(f"{float(v):+.3f}" for v in x[0][:, background].mean(1))

    print(f"(a) forward-noised real case, x̂0 mean outside the brain per modality {list(cfg.modalities)}")
    sched = make_training_scheduler(cfg.timesteps, cfg.schedule)
    g = torch.Generator().manual_seed(0)
    for t in (10, 50, 100, 200, cfg.timesteps - 1):
        x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=g), torch.tensor([t])).double()
        print(f"  t={t:3d} sqrt(abar)={math.sqrt(sampler.schedule.alpha_bar(t)):.1e}  {bg(x0_hat(x_t, t)[0])}")

    print(f"(b) inside the chain ({sampler.label()}, {args.steps} steps), x̂0 clamped as the samplers do")

    def denoise(x_t, t):
        x0h, eps = x0_hat(x_t.double(), t)
        print(f"  t={t:3d}  {bg(x0h.clamp(-1, 1))}")
        return eps

    x = torch.randn(x0.shape, generator=g).double()
    out = run_sampler(denoise, x, sampler, args.steps, lambda: torch.randn(x.shape, generator=g).double())
    print(f"  final {bg(out.clamp(-1, 1))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

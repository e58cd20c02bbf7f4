"""Analytic sampler probe: every voxel of x0 ~ N(mu, s^2) independently, so the exact noise prediction is known
in closed form; a correct sampler's outputs then have mean mu and standard deviation s (up to its discretisation
error). A cheap first filter for few-step samplers, no network involved.

    .venv/bin/python bench/gaussian_probe.py                     # the default table
    .venv/bin/python bench/gaussian_probe.py --steps 10 25 --samplers dpmpp2m ddim:1
    .venv/bin/python bench/gaussian_probe.py --steps 5 8 10 15 25 --samplers dpmpp2m::logsnr dpmpp2m-sde:1:quadratic
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from synth.schedulers import make_sampler, run_sampler  # noqa: E402


def gaussian_denoiser(schedule, mu: float = 0.0, s: float = 0.3):
    """Exact ε̂(x_t, t) = E[ε | x_t] for x0 ~ N(mu, s^2) per voxel: (x_t - √ᾱ E[x0|x_t]) / √(1-ᾱ)."""
    def eps(x, t):
        a = schedule.alpha_bar(int(t))
        x0 = mu + a ** 0.5 * s * s / (a * s * s + 1 - a) * (x - a ** 0.5 * mu)
        return (x - a ** 0.5 * x0) / (1 - a) ** 0.5
    return eps


def probe(name: str, eta: float, steps: int, mu: float = 0.0, s: float = 0.3, n: int = 32, seed: int = 0,
          spacing: str = "leading"):
    """(mean, std) of one (1, 1, n, n, n) sample drawn with the exact denoiser."""
    sampler = make_sampler(name, eta=eta, spacing=spacing)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, n, n, n), generator=g, dtype=torch.float64)
    out = run_sampler(gaussian_denoiser(sampler.schedule, mu, s), x, sampler, steps,
                      lambda: torch.randn(x.shape, generator=g, dtype=torch.float64))
    return float(out.mean()), float(out.std())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 250])
    ap.add_argument("--samplers", nargs="+", default=["ddpm", "ddim:0", "ddim:1", "dpmpp2m"],
                    help="name, name:eta or name:eta:spacing (leading, quadratic, logsnr)")
    a = ap.parse_args(argv)
    print(f"{'sampler':<26}{'steps':>6}{'mean':>9}{'std':>9}   (truth: mean 0, std 0.300)")
    for spec in a.samplers:
        name, eta, spacing = (spec.split(":") + ["", ""])[:3]
        for steps in a.steps:
            m, sd = probe(name, float(eta or 0), steps, spacing=spacing or "leading")
            print(f"{spec:<26}{steps:>6}{m:>9.4f}{sd:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

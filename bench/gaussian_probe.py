"""Analytic sampler probe: every voxel of x0 ~ N(mu, s^2) independently, so the exact noise prediction is known
in closed form; a correct sampler's outputs then have mean mu and standard deviation s (up to its discretisation
error). A cheap first filter for few-step samplers, no network involved.

    .venv/bin/python -m bench.gaussian_probe                     # the default table
    .venv/bin/python -m bench.gaussian_probe --steps 10 25 --samplers dpmpp2m ddim:1
    .venv/bin/python -m bench.gaussian_probe --steps 5 8 10 15 25 --samplers dpmpp2m::logsnr dpmpp2m-sde:1:quadratic
    .venv/bin/python -m bench.gaussian_probe --steps 10 25 --samplers ddim:1:quadratic ddim:1:quadratic:analytic
    .venv/bin/python -m bench.gaussian_probe --steps 5 10 25 --samplers ddim:1:logsnr:analytic --oracle-variance

--oracle-variance gives the analytic samplers the exact Var[x0 | x_t] of the Gaussian instead of their per-sample
estimate from ε̂, separating the estimate's error from the step's.
"""
from __future__ import annotations

import argparse
import sys

import torch

import synth.schedulers
from synth.schedulers import make_sampler, run_sampler


def gaussian_denoiser(schedule, mu: float = 0.0, s: float = 0.3):
    """Exact ε̂(x_t, t) = E[ε | x_t] for x0 ~ N(mu, s^2) per voxel: (x_t - √ᾱ E[x0|x_t]) / √(1-ᾱ)."""
    def eps(x, t):
        a = schedule.alpha_bar(int(t))
        x0 = mu + a ** 0.5 * s * s / (a * s * s + 1 - a) * (x - a ** 0.5 * mu)
        return (x - a ** 0.5 * x0) / (1 - a) ** 0.5
    return eps


def probe(name: str, eta: float, steps: int, mu: float = 0.0, s: float = 0.3, n: int = 32, seed: int = 0,
          spacing: str = "leading", analytic: bool = False):
    """(mean, std) of one (1, 1, n, n, n) sample drawn with the exact denoiser."""
    sampler = make_sampler(name, eta=eta, spacing=spacing, analytic=analytic)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 1, n, n, n), generator=g, dtype=torch.float64)
    out = run_sampler(gaussian_denoiser(sampler.schedule, mu, s), x, sampler, steps,
                      lambda: torch.randn(x.shape, generator=g, dtype=torch.float64))
    return float(out.mean()), float(out.std())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 25, 50, 250])
    ap.add_argument("--samplers", nargs="+", default=["ddpm", "ddim:0", "ddim:1", "dpmpp2m"],
                    help="name, name:eta, name:eta:spacing (leading, quadratic, logsnr) or name:eta:spacing:analytic "
                         "(Analytic-DPM's variance; ddpm and ddim)")
    ap.add_argument("--oracle-variance", action="store_true",
                    help="analytic samplers use the exact Var[x0 | x_t] (mean 0, std 0.3) instead of the estimate")
    a = ap.parse_args(argv)
    if a.oracle_variance:  # the closed form for x0 ~ N(0, 0.3²): s²(1-ᾱ)/(ᾱs² + 1-ᾱ), the same for every voxel
        synth.schedulers.x0_variance = lambda eps, a_t: torch.full(
            (eps.shape[0],) + (1,) * (eps.dim() - 1), 0.09 * (1 - a_t) / (0.09 * a_t + 1 - a_t), dtype=eps.dtype)
    print(f"{'sampler':<26}{'steps':>6}{'mean':>9}{'std':>9}   (truth: mean 0, std 0.300)")
    for spec in a.samplers:
        name, eta, spacing, variance = (spec.split(":") + ["", "", ""])[:4]
        if variance not in ("", "analytic"):
            ap.error(f"{spec}: the fourth field is 'analytic' or empty, not {variance!r}")
        for steps in a.steps:
            m, sd = probe(name, float(eta or 0), steps, spacing=spacing or "leading", analytic=variance == "analytic")
            print(f"{spec:<26}{steps:>6}{m:>9.4f}{sd:>9.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sample quality of few-step samplers vs 250-step DDPM on a trained generator (ratios in one run).

    .venv/bin/python bench/bench_sampler_quality.py --study runs/bench-study2 [--case 0]

For one training mask: seconds per volume, voxel correlation with the real image that owns the mask, and the mean
outside the brain (the real value is -1). Results: docs/benchmarks.md ("Sampler quality at few steps").
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from synth.checkpoint import load_generator
from synth.data import load_items, training_rows
from synth.schedulers import make_sampler, sample

RUNS = [("ddpm", 250, 0.0), ("ddim", 25, 0.0), ("ddim", 50, 0.0), ("dpmpp2m", 25, 0.0), ("dpmpp2m", 50, 0.0),
        ("ddim", 25, 1.0), ("ddim", 50, 1.0)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="study folder with medddpm/ and cohort/train_n*_seed*.csv")
    ap.add_argument("--case", type=int, default=0, help="index of the training mask to condition on")
    args = ap.parse_args()
    torch.set_num_threads(2)
    study = Path(args.study)
    model, cfg, _ = load_generator(study / "medddpm")
    manifest = next((study / "cohort").glob("train_n*_seed*.csv"))
    item = load_items(manifest, cfg, training_rows(manifest, cfg).iloc[[args.case]])[0]
    real = item["image"].numpy()
    brain = real[0] > -0.99
    base = None
    for name, steps, eta in RUNS:
        t0 = time.perf_counter()
        x = sample(model, make_sampler(name, eta=eta), item["condition"][None], real.shape[0], steps, [0],
                   prediction=cfg.prediction)[0].numpy()
        dt = time.perf_counter() - t0
        base = base or dt
        corr = np.corrcoef(x.ravel(), real.ravel())[0, 1]
        print(f"{name:8s} steps={steps:3d} eta={eta:g}  {dt:6.1f} s ({base / dt:4.1f}x DDPM-250)  "
              f"corr={corr:.3f}  bg_mean={x[:, ~brain].mean():.2f}")


if __name__ == "__main__":
    main()

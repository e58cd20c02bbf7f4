"""Seconds per synthetic volume: DDIM and DPM-Solver++(2M) vs the paper's 250-step ancestral DDPM, in one run.

Uses the synth profile's network at its grid (weights from --checkpoint if given, else random: speed does not
depend on the weights) and a toy mask; batch size --batch. Quality parity is measured separately by the study's
semantic-consistency Dice (eval).

    .venv/bin/python -m bench.bench_samplers --profile demo --threads 2
"""
from __future__ import annotations

import argparse
import sys
import time


def main() -> None:
    import numpy as np
    import torch

    from cohort.profiles import get_profile
    from synth.checkpoint import load_generator
    from synth.config import get_config
    from synth.network import build_unet, condition_from_label
    from bench.toy_data import make_toy_case
    from synth.schedulers import make_sampler, sample

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--checkpoint", help="generator.safetensors (optional)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--runs", default="ddpm:250,ddim:50,ddim:25,dpmpp2m:25,dpmpp2m:15",
                    help="comma-separated sampler:steps; the first is the reference")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        model, cfg, _ = load_generator(args.checkpoint)
    else:
        cfg = get_config(args.profile)
        torch.manual_seed(0)
        model = build_unet(cfg).eval()
    shape = get_profile(cfg.profile).shape
    _, label = make_toy_case(np.random.default_rng(0), shape=shape)
    cond = torch.stack([condition_from_label(label, cfg.condition)] * args.batch)
    sample(model, make_sampler("ddim"), cond, cfg.out_channels, 2, list(range(args.batch)))  # warm-up
    rows = []
    for spec in args.runs.split(","):
        name, steps = spec.split(":")
        t0 = time.perf_counter()
        sample(model, make_sampler(name), cond, cfg.out_channels, int(steps), list(range(args.batch)),
               prediction=cfg.prediction)
        rows.append((name, int(steps), (time.perf_counter() - t0) / args.batch))
        print(f"  done: {spec}", file=sys.stderr)
    ref = rows[0][2]
    print(f"profile {cfg.profile} grid {shape}, batch {args.batch}, {args.threads} threads")
    print("| sampler | steps | s / volume | speed-up vs " + f"{rows[0][0]} {rows[0][1]} |")
    print("|---|---|---|---|")
    for name, steps, s in rows:
        print(f"| {name} | {steps} | {s:.2f} | {ref / s:.1f}x |")


if __name__ == "__main__":
    main()

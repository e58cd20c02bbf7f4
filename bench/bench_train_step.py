"""Med-DDPM training-step speed and memory: speed-ups vs a plain eager fp32 MONAI baseline, in one run.

Each variant runs in its own subprocess (peak RSS is per process) on the same config, batch and data:
the synth profile's network at its cohort-profile grid, a fixed toy batch (bench.toy_data.make_toy_case).
Prints a table of median step time, peak RSS, ratios to the baseline, first/last loss (does it still fall?)
and achieved GFLOP/s against this machine's measured fp32 matmul peak.

    .venv/bin/python -m bench.bench_train_step --profile demo --steps 12
    .venv/bin/python -m bench.bench_train_step --profile paper-wholehead --grid 48 --steps 4 --warmup 2 \
        --variants "channels_last_3d;SDPA attention;torch.compile max-autotune-no-cudagraphs"
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import own_peak_rss_bytes, time_calls
from bench.toy_data import make_toy_case

ROOT = Path(__file__).resolve().parents[1]

# each variant changes these options of the plain eager fp32 baseline (2 threads)
BASELINE = dict(threads=2, channels_last=False, bf16=False, compile=False, flash_attention=False, fused_adam=False)
VARIANTS = {
    "baseline: eager fp32, 2 threads": {},
    "1 thread": dict(threads=1),
    "channels_last_3d": dict(channels_last=True),
    "bf16 autocast": dict(bf16=True),
    "bf16 + channels_last_3d": dict(bf16=True, channels_last=True),
    "SDPA attention": dict(flash_attention=True),
    "torch.compile": dict(compile=True),
    "torch.compile max-autotune-no-cudagraphs": dict(compile="max-autotune-no-cudagraphs"),
    "channels_last_3d + SDPA attention": dict(channels_last=True, flash_attention=True),
    "fused Adam": dict(fused_adam=True),
    "1 thread + channels_last_3d": dict(threads=1, channels_last=True),
    "1 thread + bf16": dict(threads=1, bf16=True),
    "1 thread + bf16 + channels_last_3d": dict(threads=1, bf16=True, channels_last=True),
    "1 thread + fused Adam": dict(threads=1, fused_adam=True),
}


def _batch(cfg, shape, batch_size):
    import numpy as np
    import torch

    from synth.network import condition_from_label

    rng = np.random.default_rng(0)
    imgs, conds = [], []
    for _ in range(batch_size):
        images, label = make_toy_case(rng, shape=shape)
        imgs.append(torch.from_numpy(np.stack([images[m] for m in cfg.modalities])))
        conds.append(condition_from_label(label, cfg.condition))
    return torch.stack(imgs), torch.stack(conds)


def run_variant(profile: str, name: str, steps: int, warmup: int, grid: int | None = None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cohort.profiles import get_profile
    from synth.config import get_config
    from synth.network import build_unet
    from synth.schedulers import make_training_scheduler
    from synth.train import diffusion_loss

    o = {**BASELINE, **VARIANTS[name]}
    threads, cl, bf16, comp, flash, fused = (o[k] for k in BASELINE)
    torch.set_num_threads(threads)
    cfg = get_config(profile).replace(channels_last=cl, precision="bf16" if bf16 else "fp32", use_flash_attention=flash)
    shape = (grid,) * 3 if grid else get_profile(cfg.profile).shape
    torch.manual_seed(0)
    model = build_unet(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, fused=fused or None)
    fwd = (torch.compile(model, mode=comp) if isinstance(comp, str) else torch.compile(model)) if comp else model
    sched = make_training_scheduler(cfg.timesteps)
    x0, cond = _batch(cfg, shape, cfg.batch_size)
    g = torch.Generator().manual_seed(0)

    def step():
        t = torch.randint(0, cfg.timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        opt.zero_grad(set_to_none=True)
        loss = diffusion_loss(fwd, x0, cond, t, noise, sched, cfg.loss, cl, torch.bfloat16 if bf16 else None)
        loss.backward()
        opt.step()
        return float(loss.detach())

    t_compile = time.perf_counter()
    losses = [step() for _ in range(warmup)]
    t_compile = time.perf_counter() - t_compile
    timing = time_calls(lambda: losses.append(step()), steps)
    flops = 0
    if name.startswith("baseline"):
        with FlopCounterMode(display=False) as fc:
            step()
        flops = fc.get_total_flops()
    k = len(losses) // 3
    return {"name": name, "median_s": timing.median, "warmup_s": t_compile,
            "peak_rss_gb": own_peak_rss_bytes() / 1024 ** 3,
            "loss_first": sum(losses[:k]) / k, "loss_last": sum(losses[-k:]) / k, "flops": flops}


def matmul_peak_gflops(threads: int = 2, n: int = 2048, reps: int = 5) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    best = time_calls(lambda: a @ b, reps, warmup=1).min
    return 2 * n ** 3 / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--steps", type=int, default=12, help="timed steps per variant (after warm-up)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--variants", default="all", help="semicolon-separated subset of: " + "; ".join(VARIANTS))
    ap.add_argument("--timeout", type=float, default=900, help="seconds per variant (torch.compile is slow)")
    ap.add_argument("--grid", type=int, help="cubic grid edge instead of the profile's grid (e.g. 48 for the "
                                             "paper-wholehead network at 48^3)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        print(json.dumps(run_variant(args.profile, args._child, args.steps, args.warmup, args.grid)))
        return
    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(";")]
    if not names[0].startswith("baseline"):
        names.insert(0, next(iter(VARIANTS)))
    results = []
    for name in names:
        cmd = [sys.executable, "-m", "bench.bench_train_step", "--profile", args.profile, "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--_child", name] + (["--grid", str(args.grid)] if args.grid else [])
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=ROOT,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
        except subprocess.TimeoutExpired:
            print(f"{name}: timed out after {args.timeout} s", file=sys.stderr)
            continue
        if p.returncode != 0:
            print(f"{name}: FAILED\n{p.stderr[-1500:]}", file=sys.stderr)
            continue
        results.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(f"  done: {name}", file=sys.stderr)
    peak = matmul_peak_gflops()
    base = results[0]
    print(f"profile {args.profile}{f' at {args.grid}^3' if args.grid else ''}, {args.steps} timed steps per variant; "
          f"fp32 matmul peak (2 threads, 2048^2): "
          f"{peak:.1f} GFLOP/s; training-step FLOPs (fwd+bwd): {base['flops'] / 1e9:.2f} GFLOP")
    print("| variant | step s (median) | x baseline time | peak RSS GB | x baseline RSS | loss first->last third "
          "| warm-up s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['name']} | {r['median_s']:.3f} | {r['median_s'] / base['median_s']:.2f} | "
              f"{r['peak_rss_gb']:.2f} | {r['peak_rss_gb'] / base['peak_rss_gb']:.2f} | "
              f"{r['loss_first']:.3f} -> {r['loss_last']:.3f} | {r['warmup_s']:.1f} |")
    achieved = base["flops"] / base["median_s"] / 1e9
    best = min(results, key=lambda r: r["median_s"])
    print(f"achieved: baseline {achieved:.1f} GFLOP/s = {achieved / peak:.1%} of matmul peak; "
          f"best ({best['name']}) {base['flops'] / best['median_s'] / 1e9:.1f} GFLOP/s = "
          f"{base['flops'] / best['median_s'] / 1e9 / peak:.1%}")


if __name__ == "__main__":
    main()

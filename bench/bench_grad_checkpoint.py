"""Memory and time of one Med-DDPM training step (forward + backward, fp32) with and without activation
checkpointing, and with the earlier, coarser wrapping (whole up/down blocks) for comparison.

Each (grid, wrapping) runs in its own process (peak RSS is per process); it prints the peak RSS, how much the step
raised it above the process's peak before the step (network built, input made), the bytes autograd keeps for the
backward pass (distinct storages: a skip kept by two checkpoints counts once; the recomputation inside a
checkpoint is not counted), the step's seconds, and the loss and gradient norm (equal in every variant). The
children run with a fixed glibc mmap threshold, so freed activations leave the resident set.

    .venv/bin/python -m bench.bench_grad_checkpoint --profile demo --grids 32x40x32 64x64x64 --batch 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import own_peak_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
WRAPPINGS = ("none", "up-down-blocks", "each-block")
# a fixed glibc mmap threshold: freed tensors go back to the system, so the peak RSS follows the tensors alive
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _wrap_up_down_blocks(net) -> None:
    """The earlier wrapping: each whole up/down block and the middle block under one checkpoint."""
    import types

    from synth.grad_checkpoint import _checkpointed_forward

    for b in [*net.down_blocks, *net.up_blocks, net.middle_block]:
        b.forward = types.MethodType(_checkpointed_forward, b)


def one(profile: str, grid: tuple[int, ...], batch: int, wrapping: str, threads: int) -> dict:
    import torch

    from synth.config import get_config
    from synth.grad_checkpoint import enable_grad_checkpointing
    from synth.network import build_unet

    torch.set_num_threads(threads)
    cfg = get_config(profile)
    torch.manual_seed(0)
    net = build_unet(cfg).train()
    with torch.no_grad():  # MONAI zero-initialises the last convs: give every gradient a value to compare
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if wrapping == "each-block":
        enable_grad_checkpointing(net)
    elif wrapping == "up-down-blocks":
        _wrap_up_down_blocks(net)
    x = torch.randn(batch, cfg.in_channels, *grid)
    t = torch.arange(batch) * 100 + 17
    saved: dict[int, int] = {}

    def pack(tn):
        storage = tn.untyped_storage()
        saved[storage.data_ptr()] = storage.nbytes()
        return tn

    before = own_peak_rss_bytes()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tn: tn):
        loss = (net(x, t) - torch.randn_like(x[:, :cfg.out_channels])).square().mean()
    loss.backward()
    secs = time.perf_counter() - t0
    peak = own_peak_rss_bytes()
    grad_norm = torch.sqrt(sum(p.grad.double().square().sum() for p in net.parameters()))
    return {"profile": profile, "grid": "x".join(map(str, grid)), "batch": batch, "wrapping": wrapping,
            "peak_rss_gib": round(peak / 2 ** 30, 3), "step_rss_gib": round((peak - before) / 2 ** 30, 3),
            "kept_gib": round(sum(saved.values()) / 2 ** 30, 3), "seconds": round(secs, 2),
            "loss": float(loss), "grad_norm": float(grad_norm)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--grids", nargs="+", default=["32x40x32", "64x64x64"], help="voxel grids, XxYxZ")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("PROFILE", "GRID", "WRAPPING"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        grid = tuple(int(v) for v in a.child[1].split("x"))
        print(json.dumps(one(a.child[0], grid, a.batch, a.child[2], a.threads)))
        return 0
    print(f"profile {a.profile}, batch {a.batch}, fp32, {a.threads} threads")
    print(f"{'grid':>10} {'wrapping':>15} {'peak RSS GiB':>13} {'step GiB':>9} {'kept GiB':>9} {'s':>7} "
          f"{'loss':>12} {'grad norm':>12}")
    for grid in a.grids:
        for wrapping in WRAPPINGS:
            child = ["--threads", str(a.threads), "--batch", str(a.batch), "--child", a.profile, grid, wrapping]
            out = subprocess.run([sys.executable, "-m", "bench.bench_grad_checkpoint", *child], capture_output=True,
                                 text=True, cwd=ROOT, env={**os.environ, **MALLOC_ENV})
            if out.returncode:
                print(f"{grid:>10} {wrapping:>15} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{grid:>10} {wrapping:>15} {r['peak_rss_gib']:>13} {r['step_rss_gib']:>9} {r['kept_gib']:>9} "
                  f"{r['seconds']:>7} {r['loss']:>12.7g} {r['grad_norm']:>12.7g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

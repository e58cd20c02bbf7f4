"""Memory of one Med-DDPM training step (forward + backward) with and without activation checkpointing.

Each configuration runs in its own process (peak RSS is per process); it prints the peak RSS, the bytes of tensors
autograd saved for the backward pass (the activations checkpointing avoids keeping), seconds, and the
extrapolation of the saved bytes to the paper-brats grid 192x192x144 (they scale with the number of voxels).

    .venv/bin/python -m bench.bench_grad_checkpoint --profile paper-wholehead --sizes 64 96 --threads 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import own_peak_rss_bytes

ROOT = Path(__file__).resolve().parent.parent
PAPER_BRATS_VOXELS = 192 * 192 * 144


def one(profile: str, size: int, checkpointing: bool, threads: int) -> dict:
    import torch

    from synth.config import get_config
    from synth.grad_checkpoint import enable_grad_checkpointing
    from synth.network import build_unet

    torch.set_num_threads(threads)
    cfg = get_config(profile)
    torch.manual_seed(0)
    net = build_unet(cfg)
    if checkpointing:
        enable_grad_checkpointing(net)
    x = torch.randn(1, cfg.in_channels, size, size, size)
    t = torch.tensor([100])
    saved = [0]

    def pack(tn):
        saved[0] += tn.numel() * tn.element_size()
        return tn

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tn: tn):
        loss = net(x, t).abs().mean()
    loss.backward()
    secs = time.perf_counter() - t0
    peak = own_peak_rss_bytes() / 2 ** 30
    return {"profile": profile, "size": size, "checkpointing": checkpointing, "peak_rss_gib": round(peak, 2),
            "saved_gib": round(saved[0] / 2 ** 30, 3), "seconds": round(secs, 1),
            "saved_gib_at_192x192x144": round(saved[0] / 2 ** 30 * PAPER_BRATS_VOXELS / size ** 3, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="paper-wholehead")
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", nargs=3, metavar=("PROFILE", "SIZE", "CKPT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(one(a.child[0], int(a.child[1]), a.child[2] == "1", a.threads)))
        return 0
    print(f"{'size':>5} {'ckpt':>5} {'peak RSS GiB':>13} {'saved GiB':>10} {'s':>7} {'saved @192x192x144 GiB':>24}")
    rows = []
    for size in a.sizes:
        for ck in (False, True):
            child = ["--threads", str(a.threads), "--child", a.profile, str(size), "1" if ck else "0"]
            out = subprocess.run([sys.executable, "-m", "bench.bench_grad_checkpoint", *child], capture_output=True,
                                 text=True, cwd=ROOT)
            if out.returncode:
                print(f"{size:>5} {str(ck):>5} failed: {out.stderr.strip().splitlines()[-1:]}")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            print(f"{size:>5} {str(ck):>5} {r['peak_rss_gib']:>13} {r['saved_gib']:>10} {r['seconds']:>7} "
                  f"{r['saved_gib_at_192x192x144']:>24}")
    for size in a.sizes:
        pair = [r for r in rows if r["size"] == size]
        if len(pair) == 2:
            plain, ck = pair
            print(f"{size}^3: checkpointing keeps {ck['saved_gib'] / plain['saved_gib']:.3f}x the saved activations, "
                  f"{ck['peak_rss_gib'] / plain['peak_rss_gib']:.2f}x the peak RSS, "
                  f"{ck['seconds'] / plain['seconds']:.2f}x the time")
    return 0


if __name__ == "__main__":
    sys.exit(main())

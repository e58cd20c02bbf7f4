"""The GPU table of docs/benchmarks.md: Med-DDPM at the paper-brats grid (192x192x144, 4 modalities, base 64,
batch 1) — seconds per training step and peak GiB for fp32, bf16, bf16 + activation checkpointing, and
+ torch.compile; DDIM-25 seconds per volume. Run through bench/gpu_check.sh on a GPU machine (it installs the
wheels it needs); ``--smoke`` runs the same code at a tiny grid on the CPU (tests/test_plan.py runs it, so the
tool stays working).

    bash bench/gpu_check.sh                       # on the GPU machine, from the repository root
    python -m bench.gpu_check --smoke --device cpu
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_gib(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def train_step_time(cfg, device, amp, checkpointing, compiled, warmup, steps):
    """(seconds per optimizer step, peak GiB) of forward + backward + Adam at cfg's grid, batch cfg.batch_size."""
    from cohort.profiles import get_profile
    from synth.network import build_unet
    from synth.schedulers import make_training_scheduler
    from synth.train import diffusion_loss

    torch.manual_seed(0)
    net = build_unet(cfg.replace(grad_checkpoint=checkpointing)).to(device)
    fwd = torch.compile(net, mode="max-autotune-no-cudagraphs") if compiled else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-5)
    sched = make_training_scheduler(cfg.timesteps, cfg.schedule)
    shape = (cfg.batch_size, cfg.out_channels, *get_profile(cfg.profile).shape)
    cond_shape = (cfg.batch_size, cfg.in_channels - cfg.out_channels, *shape[2:])
    g = torch.Generator().manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + steps):
        x0 = torch.rand(shape, generator=g).mul(2).sub(1).to(device)
        cond = (torch.rand(cond_shape, generator=g) > 0.5).float().to(device)
        t = torch.randint(0, cfg.timesteps, (shape[0],), generator=g).to(device)
        noise = torch.randn(shape, generator=g).to(device)
        _sync(device)
        t0 = time.perf_counter()
        loss = diffusion_loss(fwd, x0, cond, t, noise, sched, cfg.loss, False, torch.bfloat16 if amp else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = _peak_gib(device)
    del net, fwd, opt
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return sum(times) / len(times), peak


def sample_time(cfg, device, steps, amp):
    from cohort.profiles import get_profile
    from synth.network import build_unet
    from synth.schedulers import make_sampler, sample

    torch.manual_seed(0)
    net = build_unet(cfg).to(device).eval()
    cond = torch.zeros((1, cfg.in_channels - cfg.out_channels, *get_profile(cfg.profile).shape))
    cond[:, -1] = 1
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(device)
    t0 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        sample(net, make_sampler("ddim", eta=1.0), cond, cfg.out_channels, steps, [0], device=device)
    _sync(device)
    return time.perf_counter() - t0, _peak_gib(device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", default="paper-brats")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sampling-steps", type=int, default=25)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--smoke", action="store_true", help="tiny grid, 1 step each (CPU self-test of this script)")
    ap.add_argument("--json", help="also write the rows as JSON here")
    a = ap.parse_args(argv)

    from synth.config import get_config

    device = torch.device(a.device)
    cfg = get_config("tiny" if a.smoke else a.profile)
    warmup, steps, k = (0, 1, 2) if a.smoke else (a.warmup, a.steps, a.sampling_steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; profile {cfg.profile} grid, batch {cfg.batch_size}, "
          f"{cfg.channels} channels, {cfg.num_res_blocks} res blocks")
    variants = [("fp32 eager", False, False, False), ("bf16 autocast", True, False, False),
                ("bf16 + checkpointing", True, True, False)]
    if not a.no_compile and not a.smoke:
        variants.append(("bf16 + checkpointing + torch.compile", True, True, True))
    rows = []
    for label, amp, ck, comp in variants:
        try:
            secs, peak = train_step_time(cfg, device, amp and device.type == "cuda", ck, comp, warmup, steps)
            rows.append({"what": f"train step, {label}", "seconds": secs, "peak_gib": peak})
        except Exception as e:  # an OOM or a compile failure is a row of the table, not the end of the check
            rows.append({"what": f"train step, {label}", "error": f"{type(e).__name__}: {str(e)[:120]}"})
        print(json.dumps(rows[-1]), flush=True)
    for amp in (False, True):
        try:
            secs, peak = sample_time(cfg, device, k, amp and device.type == "cuda")
            rows.append({"what": f"DDIM-{k} per volume, {'bf16' if amp else 'fp32'}", "seconds": secs,
                         "peak_gib": peak})
        except Exception as e:
            rows.append({"what": f"DDIM-{k} per volume", "error": f"{type(e).__name__}: {str(e)[:120]}"})
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["seconds"] for r in rows if r["what"] == "train step, fp32 eager" and "seconds" in r), None)
    print(f"\n| {name} | seconds | peak GiB | vs fp32 eager step |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['what']} | {r['error']} | | |")
        else:
            ratio = f"{r['seconds'] / base:.2f}x" if base and r["what"].startswith("train") else ""
            print(f"| {r['what']} | {r['seconds']:.3f} | {r['peak_gib']:.1f} | {ratio} |")
    if a.json or os.environ.get("OUT"):
        path = Path(a.json or Path(os.environ["OUT"]) / "gpu_check.json")
        path.write_text(json.dumps({"device": name, "torch": torch.__version__, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

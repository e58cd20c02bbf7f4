"""The GPU table of docs/benchmarks.md: Med-DDPM at the paper-brats grid (192x192x144, 4 modalities, base 64,
batch 1) — seconds per training step and peak GiB for fp32, bf16, bf16 + activation checkpointing, and
+ torch.compile; DDIM-25 seconds per volume (fp32 sampling runs with TF32 off, as synth.schedulers.sample does).
Run through bench/gpu_check.sh on a GPU machine (it installs what this imports beyond torch from carried wheels,
bench/gpu_check.requirements.txt); ``--smoke`` runs the same code at a tiny grid on the CPU (tests/test_plan.py
runs it with only those packages importable, so the tool and its install list stay working).

Each row is written to the JSON file (--json, or $OUT/gpu_check.json) as soon as it finishes, so a run stopped
by a timeout keeps its finished rows. A row whose memory estimate (synth.costs, the plan's model) exceeds the
device's memory less HEADROOM_GIB is skipped with that reason, as is a row not started within --budget-s. Each
row carries the plan's predicted peak (plan_gib, synth.costs.predicted_peak_bytes) beside the measured
max_memory_allocated (peak_gib): the GPU half of the memory model's check (docs/decisions/0018).

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

# device memory the plan's estimate may not use: the CUDA context, cuDNN/cuBLAS workspaces and the caching
# allocator's fragmentation
HEADROOM_GIB = 2.0


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


def device_memory(device) -> int | None:
    """Total bytes of a CUDA device's memory; None elsewhere (nothing is skipped for memory on the CPU)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def memory_skip_reason(estimate_bytes: float, total_bytes: int | None) -> str | None:
    """Why a row cannot fit (the estimate above the device's memory less HEADROOM_GIB), or None."""
    if total_bytes is None or estimate_bytes <= total_bytes - HEADROOM_GIB * 2 ** 30:
        return None
    return (f"the plan estimates {estimate_bytes / 2 ** 30:.1f} GiB (synth.costs), more than this device's "
            f"{total_bytes / 2 ** 30:.1f} GiB less {HEADROOM_GIB:g} GiB headroom")


class ResultFile:
    """The check's JSON document, rewritten atomically (core.fsutil) after every row; ``path`` None: not written."""

    def __init__(self, path: Path | None, header: dict):
        self.path, self.doc = path, {**header, "rows": []}

    @property
    def rows(self) -> list[dict]:
        return self.doc["rows"]

    def add(self, row: dict) -> None:
        from core.fsutil import atomic_write_text

        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path is not None:
            atomic_write_text(self.path, json.dumps(self.doc, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--profile", default="paper-brats")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--sampling-steps", type=int, default=25)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    ap.add_argument("--smoke", action="store_true", help="tiny grid, 1 step each (CPU self-test of this script)")
    ap.add_argument("--budget-s", type=float, default=380.0,
                    help="start no row after this many seconds (bench/gpu_check.sh stops the run at 440 s)")
    ap.add_argument("--json", help="write the rows as JSON here, each as it finishes (default: $OUT/gpu_check.json "
                                   "when OUT is set)")
    a = ap.parse_args(argv)

    from synth.config import get_config
    from synth.costs import predicted_peak_bytes

    t_start = time.perf_counter()
    device = torch.device(a.device)
    cfg = get_config("tiny" if a.smoke else a.profile)
    warmup, steps, k = (0, 1, 2) if a.smoke else (a.warmup, a.steps, a.sampling_steps)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    total = device_memory(device)
    print(f"device: {name}"
          f"{'' if total is None else f' ({total / 2 ** 30:.1f} GiB)'}; torch {torch.__version__}; profile "
          f"{cfg.profile} grid, batch {cfg.batch_size}, {cfg.channels} channels, {cfg.num_res_blocks} res blocks")
    json_path = a.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)
    out = ResultFile(Path(json_path) if json_path else None,
                     {"device": name, "torch": torch.__version__, "profile": cfg.profile})
    cuda = device.type == "cuda"

    # (what, measure it, the plan's peak in bytes: synth.costs' model with CUDA's autocast policy, tensors only, so
    # comparable with max_memory_allocated; the CUDA context is in HEADROOM_GIB)
    def train_row(label, amp, ck, comp):
        return (f"train step, {label}", lambda: train_step_time(cfg, device, amp and cuda, ck, comp, warmup, steps),
                lambda: predicted_peak_bytes(cfg, half_precision=amp, grad_checkpoint=ck, process=False))

    def sample_row(amp):
        return (f"DDIM-{k} per volume, {'bf16' if amp else 'fp32'}", lambda: sample_time(cfg, device, k, amp and cuda),
                lambda: predicted_peak_bytes(cfg, train=False, batch=1, process=False))

    rows = [train_row("fp32 eager", False, False, False), train_row("bf16 autocast", True, False, False),
            train_row("bf16 + checkpointing", True, True, False), sample_row(False), sample_row(True)]
    if not (a.no_compile or a.smoke):  # last: building it can take minutes
        rows.append(train_row("bf16 + checkpointing + torch.compile", True, True, True))
    for what, measure, estimate in rows:
        if time.perf_counter() - t_start > a.budget_s:
            out.add({"what": what, "skipped": f"not started within the {a.budget_s:g} s budget"})
            continue
        plan = estimate()
        reason = None if total is None else memory_skip_reason(plan, total)
        if reason:
            out.add({"what": what, "skipped": reason, "plan_gib": plan / 2 ** 30})
            continue
        try:
            secs, peak = measure()
            out.add({"what": what, "seconds": secs, "peak_gib": peak, "plan_gib": plan / 2 ** 30})
        except Exception as e:  # an OOM or a compile failure is a row of the table, not the end of the check
            out.add({"what": what, "error": f"{type(e).__name__}: {str(e)[:120]}"})
        if cuda:
            torch.cuda.empty_cache()
    base = next((r["seconds"] for r in out.rows if r["what"] == "train step, fp32 eager" and "seconds" in r), None)
    print(f"\n| {name} | seconds | peak GiB | plan GiB | vs fp32 eager step |\n|---|---|---|---|---|")
    for r in out.rows:
        plan = f"{r['plan_gib']:.1f}" if "plan_gib" in r else ""
        if "seconds" not in r:
            print(f"| {r['what']} | {r.get('error') or 'skipped: ' + r['skipped']} | | {plan} | |")
        else:
            ratio = f"{r['seconds'] / base:.2f}x" if base and r["what"].startswith("train") else ""
            print(f"| {r['what']} | {r['seconds']:.3f} | {r['peak_gib']:.1f} | {plan} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The paper's size, run: Med-DDPM's memory and time at 192x192x144 (paper-brats) beside what `medddpm plan`
predicts (synth.costs.predicted_peak_bytes), and the reduced-grid measurements the memory model is checked on.

Each measurement runs in its own child process (peak memory is per process) under a watchdog: the parent polls the
child's RSS (psutil) and kills it when it passes --cap-gib, so a step that would not fit is stopped, not the
machine. On the CPU the peak is the child's RSS rise over the step (ru_maxrss after it minus the RSS before it,
network and optimizer built; glibc's mmap threshold fixed so freed tensors leave the resident set); on a GPU
torch.cuda.max_memory_allocated. The prediction beside it is the plan's, without the process's base memory.

Stages (--stages): train (one optimizer step: forward, loss, backward, Adam), sample (one sampling network
evaluation, fp32, at synthesize's --batch-size), fit (the reduced grids of --fit-grids per profile and
checkpointing choice: measured vs predicted). Not here yet: the phantom import, the authors'-format import,
nnU-Net and the Dice evaluation at full size (docs/decisions/0018-measured-memory-model.md says what was run).

    .venv/bin/python -m bench.bench_fullsize --device cpu --stages fit
    .venv/bin/python -m bench.bench_fullsize --device cpu --stages train --grad-checkpoint --cap-gib 19
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the system: RSS follows live tensors
FIT_GRIDS = {"demo": ("32x32x32", "48x48x48", "64x64x64"),
             "paper-brats": ("32x32x32", "48x48x32", "64x48x48"),
             "authors-brats": ("32x32x32", "48x48x32", "64x48x48")}


def _grid(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def measure(what: str, profile: str, grid: tuple[int, ...], batch: int, precision: str, checkpointing: bool,
            device_name: str) -> dict:
    """One step in this process: what = "train" (optimizer step) or "sample" (one network evaluation)."""
    import psutil
    import torch

    from bench.harness import own_peak_rss_bytes
    from synth.config import get_config
    from synth.network import build_unet

    device = torch.device(device_name)
    cfg = get_config(profile).replace(grad_checkpoint=checkpointing and what == "train")
    torch.manual_seed(0)
    net = build_unet(cfg).to(device).train(what == "train")
    x = torch.randn(batch, cfg.in_channels, *grid, device=device)
    t = torch.arange(batch, device=device) * 37 + 5
    amp = precision == "bf16"
    opt = torch.optim.Adam(net.parameters(), lr=1e-5) if what == "train" else None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    if what == "train":
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = net(x, t)
        loss = (out.float() - x[:, :cfg.out_channels]).abs().mean()
        loss.backward()
        opt.step()
        result = {"loss": float(loss)}
    else:
        with torch.no_grad():
            net(x, t)
        result = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = own_peak_rss_bytes()
    return {**result, "seconds": time.perf_counter() - t0, "rise_gib": (peak - before) / GIB}


def predicted_gib(what: str, profile: str, grid: tuple[int, ...], batch: int, precision: str, checkpointing: bool,
                  device_type: str) -> float:
    """The plan's model of the step's rise above what is held before it (the weights): synth.costs' tracked peak
    less the weights, bf16-scaled as the plan does, calibrated (CPU_RSS_FACTOR, CPU_STEP_OFFSET_BYTES) on a CPU."""
    from synth import costs
    from synth.config import get_config

    cfg = get_config(profile)
    train = what == "train"
    tp = costs.tracked_peak(cfg, grid, batch, train=train, grad_checkpoint=checkpointing)
    ratio = costs.autocast_activation_ratio(cfg, device_type) if precision == "bf16" and train else 1.0
    rise = tp.fixed - costs._n_params(cfg) * 4 + tp.voxel * ratio
    if device_type == "cpu":
        rise = costs.CPU_RSS_FACTOR * rise + costs.CPU_STEP_OFFSET_BYTES
    return rise / GIB


def run_child(args: list[str], cap_gib: float, poll: float = 0.2) -> dict:
    """Run `python -m bench.bench_fullsize --child ARGS` and return its JSON line; killed past cap_gib RSS."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_fullsize", "--child", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **MALLOC_ENV})
    ps, top = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            rss = ps.memory_info().rss
        except psutil.NoSuchProcess:
            break
        top = max(top, rss)
        if rss > cap_gib * GIB:
            proc.kill()
            proc.wait()
            return {"error": f"killed by the watchdog at {rss / GIB:.1f} GiB RSS (cap {cap_gib:g} GiB)"}
        time.sleep(poll)
    out, err = proc.communicate()
    if proc.returncode:
        return {"error": (err.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:200]}
    return json.loads(out.strip().splitlines()[-1])


def row(what, profile, grid, batch, precision, ckpt, device, cap_gib) -> dict:
    gtext = "x".join(map(str, grid))
    r = run_child([what, profile, gtext, str(batch), precision, str(int(ckpt)), device], cap_gib)
    pred = predicted_gib(what, profile, grid, batch, precision, ckpt, device.split(":")[0])
    out = {"stage": what, "profile": profile, "grid": gtext, "batch": batch, "precision": precision,
           "checkpointing": ckpt, "predicted_gib": round(pred, 3), **r}
    print(json.dumps(out), flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", nargs="+", default=["train", "sample"], choices=("train", "sample", "fit"))
    ap.add_argument("--profile", default="paper-brats")
    ap.add_argument("--grid", default="192x192x144")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--sample-batch", type=int, help="volumes per network evaluation (default synthesize's)")
    ap.add_argument("--fit-profiles", nargs="+", default=["demo", "paper-brats"])
    ap.add_argument("--cap-gib", type=float, default=6.0, help="watchdog: kill a child past this RSS")
    ap.add_argument("--json", help="append each row here as JSON lines")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        what, profile, grid, batch, precision, ckpt, device = a.child
        print(json.dumps(measure(what, profile, _grid(grid), int(batch), precision, ckpt == "1", device)))
        return 0
    from synth import defaults
    from synth.config import get_config

    rows = []
    for stage in a.stages:
        if stage == "fit":
            for profile in a.fit_profiles:
                batch = get_config(profile).batch_size
                for ckpt in (False, True):
                    for grid in FIT_GRIDS[profile]:
                        rows.append(row("train", profile, _grid(grid), batch, a.precision, ckpt, a.device, a.cap_gib))
        elif stage == "train":
            rows.append(row("train", a.profile, _grid(a.grid), get_config(a.profile).batch_size, a.precision,
                            a.grad_checkpoint, a.device, a.cap_gib))
        else:
            rows.append(row("sample", a.profile, _grid(a.grid), a.sample_batch or defaults.BATCH_SIZE, "fp32",
                            False, a.device, a.cap_gib))
        if a.json:
            Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print("\n| stage | profile | grid | batch | precision | checkpointing | seconds | peak GiB (step) | "
          "plan GiB | plan / measured |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['stage']} | {r['profile']} | {r['grid']} | {r['batch']} | {r['precision']} | "
                  f"{r['checkpointing']} | {r['error']} | | {r['predicted_gib']:.2f} | |")
        else:
            print(f"| {r['stage']} | {r['profile']} | {r['grid']} | {r['batch']} | {r['precision']} | "
                  f"{r['checkpointing']} | {r['seconds']:.1f} | {r['rise_gib']:.2f} | {r['predicted_gib']:.2f} | "
                  f"{r['predicted_gib'] / r['rise_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

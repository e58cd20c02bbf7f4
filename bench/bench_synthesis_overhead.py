"""Where a few-step sampler's time per volume goes: synthesize_cohort whole, its network sampling alone, and
everything but the sampling (load, mask check, quality gate, NIfTI writes, manifest), in one run.

Usage: .venv/bin/python -m bench.bench_synthesis_overhead --generator G --masks M [--sampler distilled --steps 2]
       [--count 8] [--repeats 7] [--threads 2]
M: a masks manifest as synthesize takes it (e.g. the sampler table's W/cohort/train_n8_seed0.csv). Each repeat times,
in turn: (1) synthesize_cohort into an empty folder; (2) the same call with synth.synthesize.sample replaced by a
replay of the samples call (1) drew (the same arrays, so the gate judges the same volumes), which leaves everything
but the network sampling; (3) synth.schedulers.sample alone on the same masks, batches and seeds. Prints min and
median of each, per volume, and the share of (2) in (1).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from bench.harness import Timing


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", required=True)
    ap.add_argument("--masks", required=True)
    ap.add_argument("--sampler", default="distilled")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--count", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    import synth.synthesize as synthesize
    from synth.schedulers import sample

    torch.set_num_threads(args.threads)
    config = synthesize.SynthesisConfig(count=args.count, sampler=args.sampler, steps=args.steps,
                                        num_threads=args.threads, progress=False)
    drawn: dict[tuple, torch.Tensor] = {}
    calls: list[tuple] = []

    def recording(model, sampler, condition, *a, **kw):
        x = sample(model, sampler, condition, *a, **kw)
        seeds = tuple(a[2])
        drawn[seeds] = x
        calls.append((model, sampler, condition, a, kw))
        return x

    def replay(model, sampler, condition, out_channels, steps, seeds, **kw):
        return drawn[tuple(seeds)].clone()

    seconds: dict[str, list[float]] = {"whole": [], "all but sampling": [], "sampling alone": []}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pool"

        def synthesize_once(sample_fn) -> float:
            shutil.rmtree(out, ignore_errors=True)
            synthesize.sample = sample_fn
            try:
                t0 = time.perf_counter()
                synthesize.synthesize_cohort(args.generator, args.masks, out, config)
                return time.perf_counter() - t0
            finally:
                synthesize.sample = sample

        synthesize_once(recording)  # untimed: records the calls and arrays the replay gives back
        for _ in range(args.repeats):
            seconds["whole"].append(synthesize_once(sample))
            seconds["all but sampling"].append(synthesize_once(replay))
            t0 = time.perf_counter()
            with torch.no_grad():
                for model, sampler, condition, a, kw in calls:
                    sample(model, sampler, condition, *a, **kw)
            seconds["sampling alone"].append(time.perf_counter() - t0)
    timing = {k: Timing(tuple(v)) for k, v in seconds.items()}
    print(f"{args.count} volumes, {args.sampler} {args.steps} steps, {args.threads} threads, {args.repeats} repeats "
          f"(batches sampled: {len(calls)}):")
    for name, t in timing.items():
        print(f"  {name:18s} min {t.min:.3f} s  median {t.median:.3f} s  per volume min "
              f"{t.min / args.count * 1e3:.1f} ms  median {t.median / args.count * 1e3:.1f} ms")
    print(f"  all but sampling / whole: min {timing['all but sampling'].min / timing['whole'].min:.2f}, "
          f"median {timing['all but sampling'].median / timing['whole'].median:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

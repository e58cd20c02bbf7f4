"""The cost of training previews (`medddpm train --preview-every`, synth.preview) in training steps: seconds per
demo training step against seconds per preview (3 masks, DDIM-10), measured in one run, repeated (min and median).

    .venv/bin/python -m bench.bench_preview --study runs/default-study --work W [--steps 6 --repeats 3 --threads 1]

It trains --steps demo steps on the study's cohort (the first step, which warms up, is left out of the step times),
then writes --repeats previews with the study's fine-tuned generator, timing the sampling and the whole preview
(sampling, figure, PNG). The ratio, a preview in training steps, is what `--preview-every N` adds: 1 / N of it.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--study", type=Path, required=True, help="a finished default study (`make study`)")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    import pandas as pd
    import torch

    from synth.checkpoint import load_generator
    from synth.data import training_rows
    from synth.preview import PreviewConfig, Previews
    from synth.train import train_medddpm

    torch.set_num_threads(args.threads)
    manifest = args.study / "cohort" / "data_manifest.csv"
    run = args.work / f"train-{args.steps}"
    train_medddpm(manifest, "demo", run, {"steps": args.steps, "num_threads": args.threads, "progress": False,
                                          "checkpoint_every": args.steps})
    step_s = pd.read_csv(run / "loss_log.csv")["seconds"].astype(float).iloc[1:].tolist()

    ema, cfg, _ = load_generator(args.study / "medddpm" / "generator.safetensors")
    previews = Previews(PreviewConfig(every=100), manifest, cfg, training_rows(manifest, cfg), args.work / "previews")
    log_rows = pd.read_csv(args.study / "medddpm" / "loss_log.csv").to_dict("records")
    sample_s, preview_s = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        previews.samples(ema)
        sample_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        previews.write(ema, cfg.steps, cfg.steps, log_rows)
        preview_s.append(time.perf_counter() - t0)

    def stats(xs):
        return {"min": round(min(xs), 3), "median": round(statistics.median(xs), 3), "n": len(xs)}

    out = {"step_s": stats(step_s), "preview_sampling_s": stats(sample_s), "preview_s": stats(preview_s),
           "preview_in_steps_median": round(statistics.median(preview_s) / statistics.median(step_s), 2),
           "preview_in_steps_min": round(min(preview_s) / min(step_s), 2), "threads": args.threads}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

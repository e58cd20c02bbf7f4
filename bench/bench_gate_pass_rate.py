"""Quality-gate pass rate of the default study's samples: the demo generator trained as `make study` trains it
(phantom-v1 demo cohort, 8 real training cases drawn with seed 0, the demo recipe), then one sample per mask of
its training cases with the default sampler, judged by the gate (first draw only, no redraws) and, for
comparison, by the first gate (per-label median inside the training [min, max] +- 0.05).

    .venv/bin/python bench/bench_gate_pass_rate.py --work runs/bench-gate
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def first_gate_failures(image, label, stats, modalities, margin=0.05):
    """The gate before 2026-12 (median per label within the training cases' [min, max] +- margin)."""
    out = []
    for v in np.unique(label).tolist():
        sel = label == v
        if v not in (1, 2, 3, 4) or sel.sum() < 5 or str(v) not in stats["labels"]:
            continue
        for ci, m in enumerate(modalities):
            s = stats["labels"][str(v)].get(m)
            if s and not s["min"] - margin <= float(np.median(image[ci][sel])) <= s["max"] + margin:
                out.append(f"{v}/{m}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--n-real", type=int, default=8)
    ap.add_argument("--samples-per-mask", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)

    import pandas as pd
    import torch

    from cohort.manifest import load_manifest, select, write_manifest
    from cohort.phantom import build_phantom_cohort
    from synth import defaults
    from synth.checkpoint import RANGES_FILE, load_generator
    from synth.data import load_items, training_rows
    from synth.quality import check_sample, load_ranges
    from synth.schedulers import make_sampler, sample
    from synth.train import train_medddpm

    work = Path(a.work)
    cohort = build_phantom_cohort(work / "cohort", n_cases=48, seed=0, profile="demo", progress=False)
    train = select(load_manifest(cohort), source="real", split="train").sort_values("case_id")
    pick = np.sort(np.random.default_rng(0).permutation(len(train))[:a.n_real])  # as the study draws them
    selected = cohort.parent / f"train_n{a.n_real}_seed0.csv"
    write_manifest(train.iloc[pick], selected)
    gen = train_medddpm(selected, "demo", work / "medddpm", {"num_threads": a.threads, "progress": False})
    model, cfg, _ = load_generator(gen)
    stats = load_ranges(gen.parent / RANGES_FILE)
    items = load_items(selected, cfg, training_rows(selected, cfg))
    sampler = make_sampler(defaults.SAMPLER, eta=defaults.ETA)
    rows = []
    torch.set_num_threads(a.threads)
    for i, it in enumerate(items):
        lab = np.asarray(it["label"])[0]
        cond = it["condition"][None].repeat(a.samples_per_mask, 1, 1, 1, 1)
        x = sample(model, sampler, cond, cfg.out_channels, defaults.STEPS,
                   [1000 * i + k for k in range(a.samples_per_mask)], prediction=cfg.prediction).numpy()
        for k in range(len(x)):
            new = check_sample(x[k], lab, stats, cfg.modalities)
            rows.append({"case": it["case_id"], "new_gate_pass": not new, "first_gate_pass":
                         not first_gate_failures(x[k], lab, stats, cfg.modalities),
                         "new_failures": "; ".join(new)})
    df = pd.DataFrame(rows)
    print(f"{len(df)} samples ({defaults.SAMPLER}, {defaults.STEPS} steps, eta {defaults.ETA:g}) of the demo "
          f"generator trained on {a.n_real} phantom cases")
    print(f"first gate (median in [min, max] +- 0.05): pass rate {df['first_gate_pass'].mean():.1%}")
    print(f"gate (median/background/texture envelopes): pass rate {df['new_gate_pass'].mean():.1%}")
    checks = pd.Series([f.split(":")[0] for s in df["new_failures"] for f in s.split("; ") if f])
    print("failed checks:", checks.str.split(" ").str[0].value_counts().to_dict())
    print(checks.value_counts().head(8).to_string())
    return 0


if __name__ == "__main__":
    sys.exit(main())

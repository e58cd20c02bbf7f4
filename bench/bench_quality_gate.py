"""Quality-gate calibration on the phantom: the gate learnt from the real training cases must pass held-out real
cases (target >= 95 %) and fail the same cases with added Gaussian noise (sd 0.2) or a grey background.

    .venv/bin/python -m bench.bench_quality_gate --work /tmp/gate --cases 48 --profile demo [--n-train 8]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--cases", type=int, default=48)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, help="learn the gate from the first N training cases only (the study's "
                                                "data-scarce regime uses 8)")
    a = ap.parse_args(argv)

    from cohort.phantom import build_phantom_cohort
    from synth.config import get_config
    from synth.data import load_items, training_rows
    from synth.quality import check_sample, intensity_ranges

    manifest = build_phantom_cohort(Path(a.work) / "cohort", n_cases=a.cases, seed=a.seed, profile=a.profile,
                                    progress=False)
    cfg = get_config(a.profile if a.profile in ("tiny", "demo") else "demo")
    train = load_items(manifest, cfg, training_rows(manifest, cfg))[:a.n_train]
    held = load_items(manifest, cfg, training_rows(manifest, cfg, splits=("val", "test")))
    gate = intensity_ranges(train, cfg.modalities)
    rng = np.random.default_rng(0)
    kinds = {"held-out real": lambda x, lab: x,
             "noise sd 0.2": lambda x, lab: np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1),
             "grey background": lambda x, lab: np.where(lab[None] == 0, -0.3, x)}
    print(f"gate from {len(train)} real training cases; {len(held)} held-out real cases ({a.profile})")
    for kind, f in kinds.items():
        fails = [check_sample(f(np.asarray(it["image"]), np.asarray(it["label"])[0]), np.asarray(it["label"])[0],
                              gate, cfg.modalities) for it in held]
        rate = np.mean([not x for x in fails])
        first = next((x[0] for x in fails if x), "")
        print(f"{kind:<18} pass rate {rate:6.1%}   e.g. {first}")
    print("texture envelope per modality:",
          {m: (round(s['min'], 3), round(s['max'], 3)) for m, s in gate["texture"].items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())

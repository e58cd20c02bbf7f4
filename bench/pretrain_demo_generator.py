"""Pre-train the demo generator that the project ships (synth/pretrained/demo-phantom-v1.safetensors) and write its
card. Both steps are resumable, so rerunning after an interruption (or after the run finished) only writes the card.

    .venv/bin/python bench/pretrain_demo_generator.py --work /work/pretrain

It builds the phantom cohort synth.pretrained.PRETRAIN_COHORT (160 cases, seed 1000: other draws than a study's
seed-0 cohort) and trains the demo network on its real training rows with `medddpm train` (two torch threads),
then copies generator.safetensors into synth/pretrained/ with a JSON card: the commands, the training cases'
hash, the steps and the wall time. About half an hour on our 2-core machines (docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cohort.fsutil import atomic_write_text, sha256_file  # noqa: E402
from synth.pretrained import PRETRAIN_COHORT, SHIPPED, SHIPPED_DIR  # noqa: E402

TRAIN_ARGS = ["--profile", "demo", "--steps", "4000", "--ema-decay", "0.999", "--ema-start", "800",
              "--warmup-steps", "200", "--checkpoint-every", "500", "--threads", "2", "--seed", "0", "--no-progress"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="working folder (cohort/, gen/)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    medddpm = str(Path(sys.executable).parent / "medddpm")
    build = [medddpm, "build-phantom", "--out", str(work / "cohort"), "--cases", str(PRETRAIN_COHORT["n_cases"]),
             "--seed", str(PRETRAIN_COHORT["seed"]), "--profile", PRETRAIN_COHORT["profile"]]
    train = [medddpm, "train", "--manifest", str(work / "cohort" / "data_manifest.csv"), "--out", str(work / "gen"),
             *TRAIN_ARGS]
    t0 = time.perf_counter()
    for cmd in (build, train):
        subprocess.run(cmd, check=True)
    gen = work / "gen"
    run = json.loads((gen / "config.json").read_text())
    dest = SHIPPED_DIR / SHIPPED["demo"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(gen / "generator.safetensors", dest)
    loss = (gen / "loss_log.csv").read_text().splitlines()
    card = {"file": dest.name, "sha256": sha256_file(dest), "profile": "demo",
            "what": "Med-DDPM demo network (EMA weights) pre-trained on SIMULATED-tumour phantom cases (real atlas "
                    "anatomy); fine-tuned by the demo study (flows medddpm_init='shipped')",
            "pretrain_cohort": PRETRAIN_COHORT, "train_cases": len(run["train_cases"]),
            "training_cases_hash": run["training_cases_hash"], "config_hash": run["config_hash"],
            "steps": run["steps"], "commands": [" ".join(["medddpm", *c[1:]]) for c in (build, train)],
            "last_loss_row": loss[-1], "this_invocation_wall_seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_text(dest.with_suffix(".json"), json.dumps(card, indent=1) + "\n")
    print(json.dumps(card, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Pre-train the demo generator that the project ships (synth/shipped.SHIPPED["demo"]) and write its card. Every
run is resumable, so rerunning after an interruption (or after the runs finished) only writes the card.

    make demo-generator WORK=/work/pretrain [FROM=v3|v2|v1|scratch]
    .venv/bin/python scripts/pretrain_demo_generator.py --work /work/pretrain [--from v3|v2|v1|scratch]

It builds the phantom cohort synth.shipped.PRETRAIN_COHORT (160 cases, seed 1000: other draws than a study's
seed-0 cohort) and trains the demo network on its real training rows with `medddpm train` (two torch threads).
The chain's starting points v1-v3 are kept in scripts/demo_generator_chain/ (outside the installed package):

- v1 (demo-phantom-v1.safetensors, kept as v2's starting point): 4000 steps from scratch with the paper's
  unweighted loss (V1_ARGS; about 30 minutes).
- v2 (demo-phantom-v2.safetensors, kept as v3's starting point): v1 trained further with Min-SNR-5 loss weighting,
  in the runs of V2_STAGES, each starting from the previous run's generator (about 50 minutes).
- v3 (demo-phantom-v3.safetensors, kept as v4's starting point): v2 trained further with the L2 loss and Min-SNR-5
  weighting floored at 1 (V3_STAGES, about 30 minutes), the demo profile's loss since 2026-12-02.
- v4 (shipped): v3 trained much longer with v3's loss, lr 1e-3 cosine to 1e-5 (V4_STAGES: 12 000 steps, about 80
  minutes): v3 underfitted its own training cases at high noise (docs/decisions/0008-shipped-demo-generator.md).

By default the first run starts from the v3 file in the checkout; --from v2 (or v1) reruns the chain's stages from
that file, --from scratch retrains v1 first.

Then it copies the last generator into synth/pretrained/ with a JSON card: the commands, the training cases' hash,
the steps and the wall time (docs/decisions/0008-shipped-demo-generator.md).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from core.fsutil import atomic_write_bytes, atomic_write_text, sha256_file
from synth.shipped import PRETRAIN_COHORT, SHIPPED, SHIPPED_DIR

REPO = Path(__file__).resolve().parent.parent
# the chain's starting points v1-v3: kept in the repository, outside the installed package (only v4 ships)
CHAIN_DIR = Path(__file__).resolve().parent / "demo_generator_chain"
V1_FILE = CHAIN_DIR / "demo-phantom-v1.safetensors"
# v1's run: the paper's unweighted L1 loss (the demo profile's loss then), spelled out since the profile now differs
V1_ARGS = ["--profile", "demo", "--loss", "l1", "--min-snr-gamma", "none", "--snr-weight-floor", "none",
           "--steps", "4000", "--ema-decay", "0.999", "--ema-start", "800",
           "--warmup-steps", "200", "--checkpoint-every", "500", "--threads", "2", "--seed", "0", "--no-progress"]


# what every v2/v3/v4 run shares but its seed; the loss is spelled out per chain step since the demo profile's
# default changed
def _stage(seed: int) -> list[str]:
    return ["--profile", "demo", "--min-snr-gamma", "5", "--lr", "1e-3", "--lr-schedule", "cosine", "--warmup-steps",
            "100", "--ema-decay", "0.999", "--ema-start", "0", "--checkpoint-every", "400", "--threads", "2", "--seed",
            str(seed), "--no-progress"]


_L1_STAGE = [*_stage(1), "--loss", "l1", "--snr-weight-floor", "none"]  # v2: the demo profile's loss before v3
_L2_STAGE = [*_stage(1), "--loss", "l2", "--snr-weight-floor", "1"]  # v3
# (run folder, its arguments): each run starts from the previous run's generator (the first from v1)
V2_STAGES = [("snr5", ["--steps", "1600", *_L1_STAGE]), ("snr5b", ["--steps", "3200", *_L1_STAGE]),
             ("snr5c", ["--steps", "3200", *_L1_STAGE]), ("snr5d", ["--steps", "3200", *_L1_STAGE])]
V2_FILE = CHAIN_DIR / "demo-phantom-v2.safetensors"
V3_STAGES = [("l2floor", ["--steps", "1600", *_L2_STAGE]), ("l2floorb", ["--steps", "1600", *_L2_STAGE])]
V3_FILE = CHAIN_DIR / "demo-phantom-v3.safetensors"
# v4: the same loss, one long run decaying to a low rate, a new seed (other batches and noise than v3's runs)
_V4_STAGE = [*_stage(2), "--loss", "l2", "--snr-weight-floor", "1"]
V4_STAGES = [("long", ["--steps", "12000", "--lr-min", "1e-5", "--ema-every", "1", *_V4_STAGE])]
# --from X: the file the chain starts from and the stages after it, oldest first
CHAIN = {"scratch": (None, [V2_STAGES, V3_STAGES, V4_STAGES]), "v1": (V1_FILE, [V2_STAGES, V3_STAGES, V4_STAGES]),
         "v2": (V2_FILE, [V3_STAGES, V4_STAGES]), "v3": (V3_FILE, [V4_STAGES])}


def pretrain_cohort(work: Path) -> tuple[str, str, list[str]]:
    """(the medddpm command of this interpreter, the manifest of the demo generator's pre-training cohort in
    work/cohort, the command that builds it: synth.shipped.PRETRAIN_COHORT). scripts/distill_demo_generator.py
    uses it too."""
    medddpm = str(Path(sys.executable).parent / "medddpm")
    build = [medddpm, "build-phantom", "--out", str(work / "cohort"), "--cases", str(PRETRAIN_COHORT["n_cases"]),
             "--seed", str(PRETRAIN_COHORT["seed"]), "--profile", PRETRAIN_COHORT["profile"]]
    return medddpm, str(work / "cohort" / "data_manifest.csv"), build


def run_all(commands: list[list[str]]) -> None:
    """Run each command in the repository, stopping at the first that fails."""
    for cmd in commands:
        subprocess.run(cmd, check=True, cwd=REPO)


def ship(generator: Path, dest: Path) -> str:
    """Copy ``generator`` to ``dest`` (never a half-copied shipped file); its sha256."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, generator.read_bytes())
    return sha256_file(dest)


def write_card(dest: Path, card: dict) -> None:
    """The shipped file's JSON card beside it (same name, .json), also printed."""
    atomic_write_text(dest.with_suffix(".json"), json.dumps(card, indent=1) + "\n")
    print(json.dumps(card, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="working folder (cohort/ and one folder per training run)")
    ap.add_argument("--from", dest="start", choices=tuple(CHAIN), default="v3",
                    help="where the chain starts: the v3 file (default: only v4's run), the v2 or v1 file (the later "
                         "versions' runs too) or scratch (v1's run too)")
    args = ap.parse_args(argv)
    work = Path(args.work).resolve()
    medddpm, manifest, build = pretrain_cohort(work)
    commands = [build]
    init, versions = CHAIN[args.start]
    if init is None:
        commands.append([medddpm, "train", "--manifest", manifest, "--out", str(work / "v1"), *V1_ARGS])
        init = work / "v1" / "generator.safetensors"
    init = init.relative_to(REPO) if init.is_relative_to(REPO) else init
    for name, stage_args in (stage for stages in versions for stage in stages):
        commands.append([medddpm, "train", "--manifest", manifest, "--out", str(work / name), "--init-from",
                         str(init), *stage_args])
        init = work / name / "generator.safetensors"
    t0 = time.perf_counter()
    run_all(commands)
    last = init.parent
    run = json.loads((last / "config.json").read_text())
    dest = SHIPPED_DIR / SHIPPED["demo"]
    sha256 = ship(last / "generator.safetensors", dest)
    logs = [(work / name / "loss_log.csv").read_text().splitlines() for name, _ in V4_STAGES]  # the last: `last`'s
    prev_card = json.loads(V3_FILE.with_suffix(".json").read_text())  # the version v4's stage starts from
    train_seconds = sum(float(row.split(",")[3]) for log in logs for row in log[1:])
    card = {"file": dest.name, "sha256": sha256, "profile": "demo",
            "what": "Med-DDPM demo network (EMA weights) pre-trained on SIMULATED-tumour phantom cases (real atlas "
                    "anatomy); fine-tuned by the demo study (flows medddpm_init='shipped')",
            "pretrain_cohort": PRETRAIN_COHORT, "train_cases": len(run["train_cases"]),
            "training_cases_hash": run["training_cases_hash"], "config_hash": run["config_hash"],
            "steps": int(prev_card["steps"]) + sum(int(a[1]) for _, a in V4_STAGES),
            "starts_from": {k: prev_card[k] for k in ("file", "sha256", "steps", "commands", "starts_from")},
            "commands": [" ".join(["medddpm", *c[1:]]) for c in commands],
            "last_loss_row": logs[-1][-1], "stage_train_seconds": round(train_seconds, 1),
            "this_invocation_wall_seconds": round(time.perf_counter() - t0, 1)}
    write_card(dest, card)
    return 0


if __name__ == "__main__":
    sys.exit(main())

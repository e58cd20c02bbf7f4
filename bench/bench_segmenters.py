"""Wall time and peak RSS of each segmenter back end (train + predict) on one cohort, measured in one run.

    .venv/bin/python -m bench.bench_segmenters --work /tmp/bench_seg [--manifest M] [--profile demo]
        [--backends monai nnunet]

Without --manifest it builds the demo phantom cohort (cohort.phantom, 48 cases) in WORK/cohort. Each step runs
as its own `medddpm` CLI process; CPU seconds (user+sys of the process tree, from getrusage) are
given beside wall time because wall time on a shared machine mostly measures the other users; peak RSS is the
largest sum of RSS over that process and its children
(nnU-Net runs in child processes), sampled every 0.1 s with psutil. Prints a markdown table and the ratios
nnunet/monai (timings on a shared machine are noisy: compare ratios), and writes WORK/bench_segmenters.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from bench.harness import run_measured


def _measured(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of the process tree, peak RSS of the tree in GiB) of one command that must succeed."""
    run = run_measured(cmd, poll=0.1)
    if run.returncode != 0:
        raise SystemExit(f"failed ({run.returncode}): {' '.join(cmd)}")
    return run.wall_seconds, run.cpu_seconds, run.peak_rss_bytes / 2 ** 30


def test_dice(manifest: Path, pred_dir: Path) -> float:
    """Mean whole-tumour Dice over the test cases (a local helper; eval/ has the full metrics)."""
    from cohort.manifest import case_files, load_manifest, select
    from cohort.nifti import read_label

    df = select(load_manifest(manifest), split="test")
    d = []
    for _, row in df.iterrows():
        truth = np.isin(read_label(case_files(manifest, row).label)[0], (1, 2, 3))
        pred = read_label(pred_dir / f"{row['case_id']}.nii.gz")[0] > 0
        d.append(2 * (truth & pred).sum() / max(truth.sum() + pred.sum(), 1))
    return float(np.mean(d))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--manifest", type=Path, default=None)
    ap.add_argument("--profile", default="demo", choices=("tiny", "demo", "paper"))
    ap.add_argument("--backends", nargs="+", default=["monai", "nnunet"])
    ap.add_argument("--n-cases", type=int, default=48)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    manifest = a.manifest
    if manifest is None:
        from cohort.phantom import build_phantom_cohort

        manifest = build_phantom_cohort(a.work / "cohort", n_cases=a.n_cases, seed=0, profile="demo")
    cli = [sys.executable, "-m", "medddpm.cli"]
    results = {}
    for backend in a.backends:
        model = a.work / f"model_{backend}_{a.profile}"
        pred = a.work / f"pred_{backend}_{a.profile}"
        t_train, cpu_train, rss_train = _measured(cli + ["segment-train", "--manifest", str(manifest), "--split",
                                                         "train", "--out", str(model), "--backend", backend,
                                                         "--profile", a.profile])
        t_pred, cpu_pred, rss_pred = _measured(cli + ["segment-predict", "--model", str(model), "--manifest",
                                                      str(manifest), "--split", "test", "--out", str(pred)])
        summary = json.loads((model / "training_summary.json").read_text())
        results[backend] = dict(train_s=t_train, train_cpu_s=cpu_train, train_peak_rss_gib=rss_train,
                                predict_s=t_pred, predict_cpu_s=cpu_pred, predict_peak_rss_gib=rss_pred,
                                test_wt_dice=test_dice(manifest, pred), epochs_run=summary.get("epochs_run"))
    print("\n| back end | train wall s | train CPU s | train peak RSS GiB | predict wall s | predict CPU s "
          "| predict peak RSS GiB | epochs run | test WT Dice |\n|---|---|---|---|---|---|---|---|---|")
    for b, r in results.items():
        print(f"| {b} | {r['train_s']:.1f} | {r['train_cpu_s']:.1f} | {r['train_peak_rss_gib']:.2f} | "
              f"{r['predict_s']:.1f} | {r['predict_cpu_s']:.1f} | {r['predict_peak_rss_gib']:.2f} | "
              f"{r['epochs_run']} | {r['test_wt_dice']:.3f} |")
    if "monai" in results and "nnunet" in results:
        m, n = results["monai"], results["nnunet"]
        print(f"\nratios nnunet/monai: train wall {n['train_s'] / m['train_s']:.2f}, train CPU "
              f"{n['train_cpu_s'] / m['train_cpu_s']:.2f}, "
              f"train peak RSS {n['train_peak_rss_gib'] / m['train_peak_rss_gib']:.2f}, "
              f"predict wall {n['predict_s'] / m['predict_s']:.2f}, "
              f"predict CPU {n['predict_cpu_s'] / m['predict_cpu_s']:.2f}")
    (a.work / "bench_segmenters.json").write_text(json.dumps({"manifest": str(manifest), "profile": a.profile,
                                                              "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

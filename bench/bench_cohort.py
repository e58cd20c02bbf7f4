"""Cohort data-layer cost: BraTS import per case and nnU-Net export per case, at BraTS size vs the demo profile.

Usage: .venv/bin/python bench/bench_cohort.py [N_CASES]
Makes N fake cases at the BraTS 2021 grid (240x240x155, 1 mm, 4 modalities), imports them at the demo and
paper-brats profiles, exports the paper-brats cohort for nnU-Net, and prints seconds per case plus ratios
(times are noisy on a shared machine; the ratios within one run are what to compare).
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: the fake-case builder lives in tests/
from cohort.brats import import_brats
from cohort.manifest import load_manifest
from cohort.nnunet import export_nnunet
from tests.cohort_fakes import write_brats_case


def main(n: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for i in range(n):
            write_brats_case(tmp / "src", f"BraTS2021_{i:05d}", rng, shape=(240, 240, 155), spacing=(1.0, 1.0, 1.0))
        t_make = (time.perf_counter() - t0) / n
        times = {}
        for profile in ("demo", "paper-brats"):
            t0 = time.perf_counter()
            rep = import_brats(tmp / "src", tmp / profile, profile=profile)
            assert len(rep.imported) == n, rep.summary()
            times[profile] = (time.perf_counter() - t0) / n
        ids = load_manifest(tmp / "paper-brats" / "data_manifest.csv")["case_id"].tolist()
        t0 = time.perf_counter()
        export_nnunet(tmp / "paper-brats" / "data_manifest.csv", tmp / "raw", 1, "Bench", ids,
                      val_ids=ids[:1])
        t_export = (time.perf_counter() - t0) / n
    print(f"cases: {n} fake BraTS cases 240x240x155x4 (writing one source case: {t_make:.2f} s)")
    print(f"import demo (32x40x32 @4.5mm):        {times['demo']:.2f} s/case")
    print(f"import paper-brats (192x192x144 @1mm): {times['paper-brats']:.2f} s/case "
          f"({times['paper-brats'] / times['demo']:.2f}x demo)")
    print(f"nnU-Net export paper-brats:           {t_export:.2f} s/case "
          f"({t_export / times['paper-brats']:.2f}x the paper-brats import)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 2)

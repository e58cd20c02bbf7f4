"""Cohort data-layer cost: import per case (serial and with worker processes) and nnU-Net export per case, at
BraTS size, plus the two rewritten steps against what they replaced.

Usage: .venv/bin/python bench/bench_cohort.py [N_CASES] [WORKERS]     (defaults 4 and 2)
Makes N fake cases at the BraTS 2021 grid (240x240x155, 1 mm, 4 modalities), imports them at the demo and
paper-brats profiles with 1 worker (serial) and with WORKERS processes, exports the paper-brats cohort for
nnU-Net, and prints seconds per case plus ratios. The worker pool's start-up (each process imports torch and
MONAI once) is measured on its own and reported both inside and outside the per-case time: over a 1251-case
import it is paid once. Times are noisy on a shared machine; the ratios within one run are what to compare.
"""
from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # repo root: the fake-case builder lives in tests/
from cohort.brats import _worker_init, import_brats
from cohort.manifest import load_manifest
from cohort.nnunet import export_nnunet
from tests.cohort_fakes import write_brats_case


def _pool_ready(_i: int) -> bool:
    import cohort.brats  # noqa: F401  (what a worker imports before its first case)
    return True


def _pool_startup(workers: int) -> float:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as ex:
        assert all(ex.map(_pool_ready, range(workers)))
    return time.perf_counter() - t0


def _steps(case_dir: Path) -> dict[str, tuple[float, float]]:
    """(old, new) seconds for the gzip read of one case's 4 modalities and for the brain-mask cleanup."""
    import nibabel as nib
    import torch
    from monai.transforms import FillHoles, KeepLargestConnectedComponent

    import cc3d
    from cohort.nifti import read_array
    from cohort.preprocess import fill_holes

    files = sorted(case_dir.glob("*_t*.nii.gz")) + sorted(case_dir.glob("*_flair.nii.gz"))
    t0 = time.perf_counter()
    old = [np.asarray(nib.load(str(f)).dataobj, dtype=np.float32) for f in files]  # nibabel's gzip stream
    t1 = time.perf_counter()
    new = [read_array(f)[0] for f in files]  # whole-file read, one-call decompression, header checks
    t2 = time.perf_counter()
    assert all((a == b).all() for a, b in zip(old, new))
    mask = new[0] > np.percentile(new[0], 50)
    t3 = time.perf_counter()
    m = torch.from_numpy(mask[None].astype(np.uint8))
    want = np.asarray(KeepLargestConnectedComponent(applied_labels=[1])(FillHoles(applied_labels=[1])(m))[0])
    t4 = time.perf_counter()
    got = cc3d.largest_k(fill_holes(mask), k=1, connectivity=26) > 0
    t5 = time.perf_counter()
    assert (got == want.astype(bool)).all()
    return {"read 4 modalities (.nii.gz)": (t1 - t0, t2 - t1), "brain-mask fill + largest component": (t4 - t3, t5 - t4)}


def main(n: int = 4, workers: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for i in range(n):
            write_brats_case(tmp / "src", f"BraTS2021_{i:05d}", rng, shape=(240, 240, 155), spacing=(1.0, 1.0, 1.0))
        t_make = (time.perf_counter() - t0) / n
        steps = _steps(tmp / "src" / "BraTS2021_00000")
        startup = _pool_startup(workers)
        times = {}
        for profile in ("demo", "paper-brats"):
            for w in (1, workers):
                t0 = time.perf_counter()
                rep = import_brats(tmp / "src", tmp / f"{profile}-{w}", profile=profile, workers=w)
                assert len(rep.imported) == n, rep.summary()
                times[profile, w] = (time.perf_counter() - t0) / n
            a = load_manifest(tmp / f"{profile}-1" / "data_manifest.csv")
            assert a.equals(load_manifest(tmp / f"{profile}-{workers}" / "data_manifest.csv"))  # same bytes
        ids = load_manifest(tmp / "paper-brats-1" / "data_manifest.csv")["case_id"].tolist()
        t0 = time.perf_counter()
        export_nnunet(tmp / "paper-brats-1" / "data_manifest.csv", tmp / "raw", 1, "Bench", ids, val_ids=ids[:1])
        t_export = (time.perf_counter() - t0) / n
    print(f"cases: {n} fake BraTS cases 240x240x155x4 (writing one source case: {t_make:.2f} s); "
          f"worker pool of {workers} starts in {startup:.1f} s")
    for name, (old, new) in steps.items():
        print(f"step {name:38s} before {old:.2f} s, now {new:.2f} s ({old / new:.1f}x faster)")
    for profile, grid in (("demo", "32x40x32 @4.5mm"), ("paper-brats", "192x192x144 @1mm")):
        s, p = times[profile, 1], times[profile, workers]
        net = max(p - startup / n, 1e-9)
        print(f"import {profile:11s} ({grid}): serial {s:.2f} s/case; {workers} workers {p:.2f} s/case "
              f"({s / p:.2f}x), without the pool start-up {net:.2f} s/case ({s / net:.2f}x); "
              f"1251 cases ~ {1251 * net / 3600:.2f} h")
    print(f"paper-brats / demo with {workers} workers (net of start-up): "
          f"{(times['paper-brats', workers] - startup / n) / (times['demo', workers] - startup / n):.2f}x")
    print(f"nnU-Net export paper-brats:           {t_export:.2f} s/case "
          f"({t_export / times['paper-brats', 1]:.2f}x the serial paper-brats import)")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 4, int(sys.argv[2]) if len(sys.argv) > 2 else 2)

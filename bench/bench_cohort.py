"""Cohort data-layer cost: import per case (serial and with worker processes) and nnU-Net export per case, at
BraTS size, plus the two rewritten steps against what they replaced.

Usage: .venv/bin/python -m bench.bench_cohort [N_CASES] [WORKERS]     (defaults 4 and 2)
Makes N fake cases at the BraTS 2021 grid (240x240x155, 1 mm, 4 modalities), imports them at the demo and
paper-brats profiles with 1 worker (serial) and with WORKERS processes, exports the paper-brats cohort for
nnU-Net, and prints seconds per case plus ratios. The worker pool's start-up (each process imports torch and
MONAI once) is measured on its own and reported both inside and outside the per-case time: over a 1251-case
import it is paid once. Wall times are noisy on a shared machine (and there a pool of N processes gets more
than 1/N of the contended cores, so its wall-time ratio can exceed N); the CPU seconds per case, also printed,
depend much less on the load and give the time on N free cores.
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bench.harness import cpu_seconds, time_calls
from bench.toy_data import write_brats_case
from cohort.brats import _worker_init, import_brats
from cohort.manifest import load_manifest
from cohort.nnunet import export_nnunet


def _pool_ready(_i: int) -> bool:
    import cohort.brats  # noqa: F401  (what a worker imports before its first case)
    return True


def _pool_startup(workers: int) -> float:
    t0 = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init) as ex:
        assert all(ex.map(_pool_ready, range(workers)))
    return time.perf_counter() - t0


def _steps(tmp: Path) -> dict[str, tuple[float, float]]:
    """(old, new) seconds (best of 3) for reading one .nii.gz modality and for the brain-mask cleanup.

    The read is timed on an int16, skull-stripped-like image (compresses about 4:1 like real BraTS files; the
    fake cases' float32 noise hardly compresses and would time zlib alone)."""
    import nibabel as nib
    import torch
    from monai.transforms import FillHoles, KeepLargestConnectedComponent
    from scipy import ndimage

    import cc3d
    from cohort.nifti import read_array, write_array
    from cohort.preprocess import fill_holes

    rng = np.random.default_rng(1)
    X, Y, Z = np.meshgrid(*[np.arange(s) for s in (240, 240, 155)], indexing="ij")
    brain = ((X - 120) / 95.0) ** 2 + ((Y - 120) / 110.0) ** 2 + ((Z - 77) / 70.0) ** 2 <= 1
    tissue = ndimage.gaussian_filter(rng.random(brain.shape, dtype=np.float32), 2) * 3000
    image = ((tissue + rng.normal(0, 20, brain.shape)) * brain).astype(np.int16)
    path = write_array(tmp / "real_like.nii.gz", image, np.diag([-1.0, -1.0, 1.0, 1.0]))
    old_read = time_calls(lambda: np.asarray(nib.load(str(path)).dataobj, dtype=np.float32), 3).min  # nibabel's
    new_read = time_calls(lambda: read_array(path), 3).min  # whole-file read, one-call decompression, header checks
    assert (read_array(path)[0] == image).all()

    mask = brain & (tissue > np.percentile(tissue, 30))
    m = torch.from_numpy(mask[None].astype(np.uint8))
    want = np.asarray(KeepLargestConnectedComponent(applied_labels=[1])(FillHoles(applied_labels=[1])(m))[0])
    assert ((cc3d.largest_k(fill_holes(mask), k=1, connectivity=26) > 0) == want.astype(bool)).all()
    old_mask = time_calls(lambda: KeepLargestConnectedComponent(applied_labels=[1])(FillHoles(applied_labels=[1])(m)),
                          3).min
    new_mask = time_calls(lambda: cc3d.largest_k(fill_holes(mask), k=1, connectivity=26), 3).min
    return {"read one modality (int16 .nii.gz)": (old_read, new_read),
            "brain-mask fill + largest component": (old_mask, new_mask)}


def main(n: int = 4, workers: int = 2) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for i in range(n):
            write_brats_case(tmp / "src", f"BraTS2021_{i:05d}", rng, shape=(240, 240, 155), spacing=(1.0, 1.0, 1.0))
        t_make = (time.perf_counter() - t0) / n
        steps = _steps(tmp)
        c0 = cpu_seconds()  # this process and its finished children (the worker pool, once shut down)
        startup = _pool_startup(workers)
        cpu_startup = cpu_seconds() - c0
        times, cpu = {}, {}
        for profile in ("demo", "paper-brats"):
            for w in (1, workers):
                t0, c0 = time.perf_counter(), cpu_seconds()
                rep = import_brats(tmp / "src", tmp / f"{profile}-{w}", profile=profile, workers=w)
                assert len(rep.imported) == n, rep.summary()
                times[profile, w] = (time.perf_counter() - t0) / n
                cpu[profile, w] = (cpu_seconds() - c0) / n
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
              f"({s / p:.2f}x), without the pool start-up {net:.2f} s/case ({s / net:.2f}x)")
        cs, cp = cpu[profile, 1], cpu[profile, workers] - cpu_startup / n
        print(f"    CPU time per case (less load-dependent than wall time): serial {cs:.2f} s, "
              f"in the workers {cp:.2f} s -> on {workers} free cores about {cp / workers:.2f} s/case, 1251 cases in "
              f"{1251 * cp / workers / 3600:.2f} h")
    print(f"paper-brats / demo, CPU per case in the workers: "
          f"{(cpu['paper-brats', workers] - cpu_startup / n) / (cpu['demo', workers] - cpu_startup / n):.2f}x")
    print(f"nnU-Net export paper-brats:           {t_export:.2f} s/case "
          f"({t_export / times['paper-brats', 1]:.2f}x the serial paper-brats import)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n_cases", nargs="?", type=int, default=4)
    ap.add_argument("workers", nargs="?", type=int, default=2)
    a = ap.parse_args()
    main(a.n_cases, a.workers)

"""NIfTI write cost: cohort.nifti.write_array (ISA-L gzip, decisions/0021) against the writer it replaced (nibabel's
own save: zlib at level 1), per modality of one phantom case at the demo grid and at the paper's.

Usage: .venv/bin/python -m bench.bench_nifti_write [--repeats 5] [--atlas sri24]
The case is the phantom's (cohort.phantom.simulate_case: real atlas anatomy, a simulated tumour) at the `demo`
profile (32x40x32) and at `paper-brats` (192x192x144, 1 mm), float32 as synthesis writes its samples. Prints, per
grid, seconds per modality file (min and median of --repeats, the four modalities in turn) for each writer, their
ratio measured in this run, and the bytes each writes; both files of a modality are checked to hold the same voxels.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from bench.harness import time_calls
from cohort.nifti import read_array, write_array


def nibabel_save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """write_array before decision 0021: nibabel's own .nii.gz writer (zlib, level 1), same header codes."""
    import nibabel as nib

    from core.fsutil import atomic_path

    img = nib.Nifti1Image(array.astype(np.float32), np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def _time_writer(write, paths: list[Path], images: list[np.ndarray], affine, repeats: int):
    """(min, median seconds per file, bytes of all files) of writing ``images`` to ``paths`` ``repeats`` times;
    checks that each file reads back as its array."""
    timing = time_calls(lambda: [write(p, a, affine) for p, a in zip(paths, images)], repeats)
    for p, a in zip(paths, images):
        assert np.array_equal(read_array(p)[0], a), p
    return timing.min / len(images), timing.median / len(images), sum(p.stat().st_size for p in paths)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--atlas", default="sri24")
    args = ap.parse_args(argv)

    from cohort.phantom import profile_affine, simulate_case
    from cohort.profiles import get_profile

    writers = {"nibabel save (zlib 1)": nibabel_save, "write_array (ISA-L 1)": write_array}
    print(f"seconds per modality file, {args.repeats} repeats of the case's four modalities:")
    with tempfile.TemporaryDirectory() as tmp:
        for profile_name in ("demo", "paper-brats"):
            profile = get_profile(profile_name)
            case = simulate_case(args.atlas, profile, np.random.default_rng(0))
            affine = profile_affine(profile)
            images = [np.asarray(case.images[m], dtype=np.float32) for m in profile.modalities]
            row = {name: _time_writer(write, [Path(tmp) / f"{profile_name}-{k}-{name.split()[0]}.nii.gz"
                                              for k in range(len(images))], images, affine, args.repeats)
                   for name, write in writers.items()}
            (old_min, old_med, old_bytes), (new_min, new_med, new_bytes) = row.values()
            print(f"  {profile_name} {'x'.join(map(str, profile.shape))}:")
            for name, (t_min, t_med, size) in row.items():
                print(f"    {name:24s} min {t_min:.4f} s  median {t_med:.4f} s  "
                      f"{size / len(images) / 1e6:.2f} MB per file")
            print(f"    ratio old/new: min {old_min / new_min:.1f}x  median {old_med / new_med:.1f}x; "
                  f"size new/old {new_bytes / old_bytes:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Write the repository's reference data_manifest.csv from a freshly built default cohort.

Usage: .venv/bin/python scripts/write_reference_manifest.py BUILT/data_manifest.csv [--out data_manifest.csv]

BUILT: `medddpm build-phantom --out BUILT` (the default cohort, the study's defaults). The reference is that
manifest with each file's NIfTI content hash beside its sha256 (cohort.manifest.with_nifti_hashes), so that
`medddpm validate ... --against data_manifest.csv` (run by `make study`) recognises the same cohort gzipped by
another zlib. Run it when the cohort's data change on purpose, and commit the result.
"""
from __future__ import annotations

import argparse

from cohort.manifest import validate_manifest, with_nifti_hashes, write_manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("built", help="the data_manifest.csv of a freshly built default cohort")
    ap.add_argument("--out", default="data_manifest.csv")
    args = ap.parse_args(argv)
    validate_manifest(args.built)  # every file has the sha256 its row records
    write_manifest(with_nifti_hashes(args.built), args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

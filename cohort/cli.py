"""Data verbs: import-brats, validate, export-nnunet (and later build-phantom, edit-masks)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a data_manifest.csv and every file it names",
                              description="Validate a manifest: schema, paths inside the data root, "
                                          "NIfTI readability, geometry, label values and sha256 hashes.")
    p.add_argument("manifest", help="path to data_manifest.csv")
    p.add_argument("--no-hashes", action="store_true", help="skip sha256 verification (faster)")
    p.add_argument("--require-tumour", action="store_true", help="refuse labels with no tumour voxels")
    p.set_defaults(func=_validate)


def _validate(args) -> int:
    from .manifest import validate_manifest

    df = validate_manifest(args.manifest, check_hashes=not args.no_hashes, require_tumour=args.require_tumour)
    counts = df.groupby(["source", "split"]).size().to_dict()
    print(f"{args.manifest}: OK, {len(df)} cases " + ", ".join(f"{k[0]}/{k[1]}={v}" for k, v in counts.items()))
    return 0

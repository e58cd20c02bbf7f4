"""CLI verb import-weights (registered by medddpm.cli): the authors' published Med-DDPM weights as our generator."""
from __future__ import annotations


def register(subparsers) -> None:
    from cohort.profiles import PROFILES as GRIDS

    from .authors_weights import FORMATS

    p = subparsers.add_parser(
        "import-weights", help="convert the Med-DDPM authors' published weights into a generator",
        description="Read the authors' checkpoint (model_brats.pt / model_128.pt) with weights_only=True, check its "
                    "noise schedule against ours, convert its axis order and condition values, and write "
                    "OUT/generator.safetensors + config.json for `medddpm synthesize --checkpoint OUT` and "
                    "`medddpm train --init-from OUT` (docs/medddpm.md).")
    p.add_argument("file", help="the authors' checkpoint file")
    p.add_argument("--format", required=True, choices=sorted(FORMATS), dest="fmt",
                   help="authors-brats (model_brats.pt, 4 modalities) or authors-wholehead (model_128.pt, T1)")
    p.add_argument("--out", required=True, help="output folder for the generator")
    p.add_argument("--weights", choices=("ema", "model"), default="ema",
                   help="which of their state dicts: ema (default; what they sample with) or model (raw)")
    p.add_argument("--profile", choices=sorted(GRIDS),
                   help="cohort profile (voxel grid) of the masks it will be used with (default: the format's: "
                        "authors-brats for BraTS, paper-wholehead for whole-head)")
    p.add_argument("--ranges-from", help="data_manifest.csv of real cases on that grid: their per-label "
                                         "intensities become the quality gate's ranges (without it synthesis "
                                         "is not gated and marks cases quality_gate=unchecked)")
    p.set_defaults(func=_import_weights)


def _import_weights(args) -> int:
    from .authors_weights import import_authors_weights

    path = import_authors_weights(args.file, args.fmt, args.out, weights=args.weights, profile=args.profile,
                                  ranges_from=args.ranges_from)
    print(f"generator: {path}")
    return 0

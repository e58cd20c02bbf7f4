"""`medddpm` console script. Each package registers its own verbs; this module only assembles them."""
from __future__ import annotations

import argparse
import importlib
import sys

# Each module exposes register(subparsers). Order = order in --help.
VERB_MODULES = ("cohort.cli", "synth.cli", "synth.import_cli", "segment.cli", "eval.cli", "flows.cli", "flows.verify")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medddpm",
        description="Med-DDPM data augmentation for 3-D brain-tumour segmentation.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB")
    sub.required = True
    for name in VERB_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from core.errors import MedDDPMError

    parser = build_parser()
    args = parser.parse_args(argv)
    args.cli_args = list(sys.argv[1:] if argv is None else argv)  # what a verb re-running itself (torchrun) passes on
    try:
        rc = args.func(args)
    except MedDDPMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the user named or must fix (missing, no permission, disk full)
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}; check the path, its permissions and the free space, then rerun "
              "(the run resumes)", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())

"""Serve the two deployments from one long-lived process:

    python -m flows.serve            # augment-study/default and regenerate-cohort/nightly (cron 0 3 * * * UTC)

Needs a Prefect API (PREFECT_API_URL, e.g. `prefect server start`). Then
`prefect deployment run 'augment-study/default'` runs the study (override parameters with -p / --params).
Stop this process before the server (a serve process whose server vanished ignores SIGTERM).
"""
from __future__ import annotations

import argparse
import sys

DEFAULT_CRON = "0 3 * * *"


def build_deployments(study_params: dict | None = None, regen_params: dict | None = None,
                      cron: str | None = DEFAULT_CRON, timezone: str = "UTC") -> list:
    """The deployments served by this module (also handy for `prefect deploy`-style reuse)."""
    from prefect.schedules import Cron
    from prefect.types.entrypoint import EntrypointType

    from .regenerate import regenerate_cohort
    from .study import augment_study

    # Module-path entry points ("flows.study.augment_study"): a flow run imports the flow under its package name.
    # A file-path entry point ("flows/study.py:augment_study") makes Prefect load the file as a top-level module
    # "study" whose relative imports create a second flows.refs ("study.refs"), so a FileRef unpickled from a
    # cache record written by `medddpm study` (class flows.refs.FileRef) failed the subflow's parameter check.
    by_module = EntrypointType.MODULE_PATH
    return [
        augment_study.to_deployment(name="default", parameters=study_params or {}, entrypoint_type=by_module,
                                    description="The augment study (docs/flows.md); override any parameter per run.",
                                    tags=["medddpm"]),
        regenerate_cohort.to_deployment(name="nightly", parameters=regen_params or {}, entrypoint_type=by_module,
                                        schedules=[Cron(cron, timezone=timezone)] if cron else [],
                                        description="A fresh versioned synthetic cohort from the current checkpoint.",
                                        tags=["medddpm"]),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study-params", help="JSON file of default parameters for augment-study/default")
    ap.add_argument("--regen-params", help="JSON file of default parameters for regenerate-cohort/nightly")
    ap.add_argument("--cron", default=DEFAULT_CRON, help=f"nightly schedule (default {DEFAULT_CRON!r}, UTC); "
                                                         "'none' serves it without a schedule")
    ap.add_argument("--limit", type=int, default=1, help="flow runs executed at once by this process (default 1)")
    args = ap.parse_args(argv)
    from prefect import serve

    from .cli import read_params

    deployments = build_deployments(read_params(args.study_params), read_params(args.regen_params),
                                    None if args.cron.lower() == "none" else args.cron)
    serve(*deployments, limit=args.limit)
    return 0


if __name__ == "__main__":  # guard: nnU-Net's spawn pools re-import the entry module
    sys.exit(main())

"""Prefect flows and deployments (orchestration only; the science is in cohort/, synth/, segment/, eval/).

Flows: augment-study, train-medddpm, synthesize-cohort, train-segmenter (flows.study), regenerate-cohort
(flows.regenerate). Deployments: `python -m flows.serve`. CLI: `medddpm study`, `medddpm regenerate-cohort`.
Details: docs/flows.md. Importing this package does not import Prefect (the CLI sets PREFECT_HOME first).
"""

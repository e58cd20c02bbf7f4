"""The one set of sampling defaults, imported by the CLI, synthesize_cohort, make_sampler, the flows and
regenerate-cohort (nothing else may restate these numbers).

DDIM with eta = 1 at 25 steps: on the demo generators it matched 250-step ancestral DDPM at 10x less time
(docs/decisions/0004-sampler-default.md); eta = 1 re-injects fresh noise each step, which hides the error of an
under-trained denoiser better than the deterministic eta = 0 ODE.
"""
SAMPLER = "ddim"
STEPS = 25
ETA = 1.0
SPACING = "leading"
ANALYTIC = False
BATCH_SIZE = 4  # volumes per network call
MAX_RETRIES = 3  # quality-gate redraws per case

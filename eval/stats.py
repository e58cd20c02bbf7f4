"""Aggregation of per-case scores: mean ± sd over cases and seeds, 95 % intervals that account for test cases and
segmenter seeds, the paired comparison of every training mix with real-only data (paired by test case;
``paired_vs_first``: of runs with a reference run, as in bench.bench_sampler_table), Holm-adjusted families of
verdicts, and the power of a design (minimum detectable Δ).

Two sources of noise: which test cases were drawn, and which segmenter seeds were trained. The point estimate is
Σ_k sign_k · (mean over test cases of each case's mean over the seeds of table k). Its interval
(``case_seed_interval``) is a t interval whose variance is the sum of two moment (ANOVA) estimates, as in a linear
mixed model with random test-case, case × mix and segmenter-seed effects (the estimates equal REML's in a balanced
design while they are positive):
- the case component: the variance over test cases of the per-case combination (seed-averaged per case), / n cases;
- the seed component, for each table: the variance of its per-seed means over test cases less the part of it
  that the case × seed noise explains (two-way residual mean square / n cases), floored at 0, / its seeds.
Degrees of freedom: Satterthwaite's, from n − 1 (cases), k − 1 (each table's seeds) and (n − 1)(k − 1) (the
residual). With 3 seeds per mix the seed part has 2 df per table, so an interval dominated by training noise uses a
t quantile near 2.8, not 1.96: a bootstrap of 3 seed values cannot see that (it called 13–16 % of null differences
significant at nominal 5 %, tests/test_eval_calibration.py).

Seeds paired across mixes: the same seed number gives the same initial weights, data order (by index into the
training list) and augmentation draws in every mix (segment.monai_backend), so a segmenter's luck is partly shared
by the mixes (real-only and synthetic-only seeds of the default study: TC per-seed differences sd 0.04 where each
mix's seeds spread 0.10; docs/decisions/0016-segmenter-noise.md). When both sides of a difference have the same seeds,
``paired_case_difference`` analyses them paired: the interval of the one cases × seeds table of differences
(``case_seed_interval`` of that table), whose seed component is only the part of the training noise that the mixes
do not share. It is valid whatever that share (with none it has k − 1 seed df instead of 2(k − 1): a little wider).
tests/test_eval_calibration.py checks the false-positive rate of both intervals over a grid of designs.
With one seed per table the seed component cannot be estimated: the interval then covers the test cases only.

``sd`` is over every (case, seed) value and ``sd_seeds`` is the spread of the per-seed means (training noise).
``bootstrap_ci`` (one level, scipy.stats.bootstrap, percentile) serves samples without seeds.
"""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd

# columns that identify one training configuration in results/per_case.csv
RUN_KEYS = ("mix", "n_real", "n_synth", "backend", "test_set")
METRICS = ("dice", "hd95")
MEAN_REGION = "mean"  # pseudo-region: the mean over WT, TC and ET of one (run, test case)
INTERVAL_METHOD = ("t interval, variance = case component + each mix's seed component (moment estimates of a "
                   "random-effects model), Satterthwaite degrees of freedom (eval.stats.case_seed_interval); a Δ "
                   "whose two mixes have the same seeds is analysed paired by seed (the table of per-seed "
                   "differences, eval.stats.paired_case_difference), otherwise each mix's seeds on their own")


def bootstrap_ci(values, *, statistic: Callable = np.mean, confidence: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of ``statistic`` over 1-D ``values`` (NaNs dropped). Same seed -> same CI.

    Fewer than 2 values: (nan, nan). Constant values: (v, v).
    """
    from scipy.stats import bootstrap

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) < 2:
        return float("nan"), float("nan")
    if np.all(x == x[0]):
        v = float(statistic(x))
        return v, v
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bootstrap((x,), statistic, confidence_level=confidence, n_resamples=n_resamples,
                        method="percentile", vectorized=statistic in (np.mean, np.median),
                        rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def mix_kind(n_real: int, n_synth: int) -> str:
    """'real only', 'synthetic only' or 'real + synthetic'."""
    if int(n_synth) == 0:
        return "real only"
    if int(n_real) == 0:
        return "synthetic only"
    return "real + synthetic"


def mix_order(df: pd.DataFrame) -> pd.DataFrame:
    """Sort rows like the paper's table: real only, synthetic only, then real + synthetic by synthetic:real ratio."""
    kind_rank = {"real only": 0, "synthetic only": 1, "real + synthetic": 2}
    key = pd.DataFrame({
        "rank": [kind_rank[mix_kind(r, s)] for r, s in zip(df["n_real"], df["n_synth"])],
        "ratio": [float(s) / float(r) if float(r) > 0 else np.inf for r, s in zip(df["n_real"], df["n_synth"])],
        "n_real": df["n_real"].astype(float), "n_synth": df["n_synth"].astype(float)}, index=df.index)
    return df.loc[key.sort_values(["rank", "ratio", "n_real", "n_synth"], kind="stable").index]


def with_mean_region(per_case: pd.DataFrame) -> pd.DataFrame:
    """per_case plus, for every (run, test set, test case) with all three of WT/TC/ET, a row with region "mean":
    the mean of its metrics over the three regions (the primary comparison's default endpoint)."""
    regions = per_case[per_case["region"].isin(("WT", "TC", "ET"))]
    keys = [c for c in per_case.columns if c not in ("region", *METRICS)]
    grouped = regions.groupby(keys, sort=False, dropna=False)
    mean = (grouped[list(METRICS)].sum(min_count=3) / 3)[grouped["region"].nunique() == 3].reset_index()  # NaN if any
    return pd.concat([per_case, mean.assign(region=MEAN_REGION)[per_case.columns]], ignore_index=True)


def _case_by_seed(g: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Test cases × seeds table of ``metric`` (mean if a (case, seed) appears twice; NaN where one is missing)."""
    return g.pivot_table(index="case_id", columns="seed", values=metric, aggfunc="mean", dropna=False)


# ------------------------------------------------------------------------------------------ the interval

class Interval(NamedTuple):
    """An estimate with its standard error, Satterthwaite degrees of freedom and two-sided interval (floats, or
    arrays for a batch of studies)."""

    estimate: float | np.ndarray
    se: float | np.ndarray
    df: float | np.ndarray
    low: float | np.ndarray
    high: float | np.ndarray

    def p_value(self):
        """Two-sided p-value of estimate = 0 (t test with the interval's se and df); NaN without an interval."""
        from scipy.stats import t

        est, se = np.asarray(self.estimate, float), np.asarray(self.se, float)
        with np.errstate(divide="ignore", invalid="ignore"):
            p = np.where(se > 0, 2 * t.sf(np.abs(est) / se, self.df), np.where(est == 0, 1.0, 0.0))
        p = np.where(np.isfinite(est) & np.isfinite(se), p, np.nan)
        return float(p) if np.ndim(p) == 0 else p


def _seed_component(t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(variance of the per-seed means, two-way case × seed residual mean square) of complete tables (..., n, k),
    and their sum's estimate of the seed variance component (the first less the second / n, floored at 0)."""
    n, k = t.shape[-2:]
    seed_means_var = t.mean(axis=-2).var(axis=-1, ddof=1)
    resid = t - t.mean(axis=-1, keepdims=True) - t.mean(axis=-2, keepdims=True) + t.mean(axis=(-2, -1), keepdims=True)
    mse = (resid ** 2).sum(axis=(-2, -1)) / ((n - 1) * (k - 1))
    return seed_means_var, mse, np.maximum(seed_means_var - mse / n, 0.0)


def _interval(per_case_combo: np.ndarray, seed_tables: list[tuple[float, np.ndarray]], confidence: float) -> Interval:
    """The interval from the per-case combination (..., n) and each table's (sign, complete cases × seeds array)."""
    from scipy.stats import t as student_t

    n = per_case_combo.shape[-1]
    est = per_case_combo.mean(axis=-1)
    case_term = per_case_combo.var(axis=-1, ddof=1) / n
    var, denom = case_term, case_term ** 2 / (n - 1)
    seeds_term, seeds_df = 0.0, 0  # the seed terms before the residual's subtraction, and their df
    for sign, tab in seed_tables:
        n_t, k = tab.shape[-2:]
        if k < 2 or n_t < 2:
            continue  # one seed: training noise is not estimable from this table
        seed_means_var, mse, _ = _seed_component(tab)
        a_seeds, a_resid = sign ** 2 * seed_means_var / k, -sign ** 2 * mse / (n_t * k)
        used = a_seeds + a_resid > 0  # a negative estimate is floored at 0 (and then carries no df)
        var = var + np.where(used, a_seeds + a_resid, 0.0)
        denom = denom + np.where(used, a_seeds ** 2 / (k - 1) + a_resid ** 2 / ((n_t - 1) * (k - 1)), 0.0)
        seeds_term, seeds_df = seeds_term + np.where(used, a_seeds, 0.0), seeds_df + (k - 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(denom > 0, var ** 2 / denom, np.inf)
    if len(seed_tables) == 1:
        # One table (a seed-paired difference, one mix's mean): where its seed term outweighs the cases', the df are
        # at most the seeds' own. Satterthwaite's plug-in df grow exactly when the few seeds happen to agree: with 3
        # seeds it called 7-8 % of null differences significant, 3.3-6.5 % with the cap
        # (tests/test_eval_calibration.py). Two tables (each side's seeds) are within 3-7 % without it.
        df = np.where((seeds_df > 0) & (seeds_term > case_term), np.minimum(df, max(seeds_df, 1)), df)
    se = np.sqrt(var)
    half = np.where(se > 0, student_t.ppf(0.5 + confidence / 2, np.where(np.isfinite(df), df, 1e9)) * se, 0.0)
    out = Interval(est, se, df, est - half, est + half)
    return Interval(*(float(v) for v in out)) if np.ndim(est) == 0 else out


def case_seed_interval(tables, signs=None, *, confidence: float = 0.95) -> Interval:
    """Interval of  Σ_k sign_k · mean over cases of (mean over seeds of tables[k])  (module docstring: the method).

    tables: arrays cases × seeds, rows in the same case order (cases are paired across tables); each may have its
    own seeds (seeds of different tables are independent). signs: default +1 each; (+1, −1) gives a paired
    difference. 2-D tables may hold NaN (a missing (case, seed)): cases without a value are dropped, and a table's
    seed component uses its cases with every seed. Tables with leading batch axes (..., cases, seeds) must be
    complete; the result is then arrays (the calibration test simulates thousands of studies at once).
    Fewer than 2 cases: all NaN. No variation: (v, v) with se 0.
    """
    tables = [np.asarray(t, dtype=float) for t in tables]
    signs = [1.0] * len(tables) if signs is None else [float(x) for x in signs]
    if (len({t.shape[:-1] for t in tables}) != 1 or len(signs) != len(tables) or any(t.ndim < 2 for t in tables)):
        raise ValueError("case_seed_interval: tables must have the same cases (rows), one sign per table")
    if tables[0].ndim > 2:
        return _interval(sum(s * t.mean(axis=-1) for s, t in zip(signs, tables)), list(zip(signs, tables)),
                         confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: a case without a value
        combo = sum(s * np.nanmean(t, axis=1) for s, t in zip(signs, tables))
    keep = np.isfinite(combo)
    if keep.sum() < 2:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, nan)
    seed_tables = []
    for s, t in zip(signs, tables):
        t = t[keep][:, np.isfinite(t[keep]).any(axis=0)]  # seeds with a value
        seed_tables.append((s, t[np.isfinite(t).all(axis=1)]))
    return _interval(combo[keep], seed_tables, confidence)


# ------------------------------------------------------------------------------------------ tables of results

def aggregate(per_case: pd.DataFrame, *, metrics=METRICS, confidence: float = 0.95) -> pd.DataFrame:
    """Mean ± sd over cases and seeds with its interval over cases and seeds (``case_seed_interval``), per (mix,
    backend, test set, region).

    per_case: rows of results/per_case.csv (needs RUN_KEYS, seed, case_id, region and the metric columns).
    Returns columns RUN_KEYS + region, kind, n_cases, n_seeds, and for each metric m:
    m_mean, m_sd, m_sd_seeds, m_ci_low, m_ci_high. Rows in the paper's mix order.
    """
    rows = []
    for key, g in per_case.groupby([*RUN_KEYS, "region"], sort=False, dropna=False):
        row = dict(zip([*RUN_KEYS, "region"], key))
        row["kind"] = mix_kind(row["n_real"], row["n_synth"])
        row["n_cases"] = int(g["case_id"].nunique())
        row["n_seeds"] = int(g["seed"].nunique())
        for m in metrics:
            vals = g[m].astype(float)
            row[f"{m}_mean"] = float(g.groupby("case_id")[m].mean().mean())
            row[f"{m}_sd"] = float(vals.std(ddof=1)) if vals.notna().sum() > 1 else float("nan")
            seed_means = g.groupby("seed")[m].mean()
            row[f"{m}_sd_seeds"] = float(seed_means.std(ddof=1)) if len(seed_means) > 1 else float("nan")
            ci = case_seed_interval([_case_by_seed(g, m).to_numpy()], confidence=confidence)
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = ci.low, ci.high
        rows.append(row)
    out = pd.DataFrame(rows)
    return mix_order(out).reset_index(drop=True) if len(out) else out


def paired_tables(mine: pd.DataFrame, theirs: pd.DataFrame, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Cases × seeds tables of both sides on the test cases both have (seed columns in ascending seed order)."""
    a, b = _case_by_seed(mine, metric), _case_by_seed(theirs, metric)
    common = a.index.intersection(b.index)
    return a.loc[common].to_numpy(dtype=float), b.loc[common].to_numpy(dtype=float)


def seeds_paired(mine: pd.DataFrame, theirs: pd.DataFrame) -> bool:
    """Whether two runs' seeds pair up: the same seed numbers (at least 2) on both sides."""
    seeds = set(mine["seed"].unique())
    return len(seeds) >= 2 and seeds == set(theirs["seed"].unique())


def paired_case_difference(mine: pd.DataFrame, theirs: pd.DataFrame, metric: str = "dice", *,
                           confidence: float = 0.95, pair_seeds: bool | None = None) -> tuple[np.ndarray, Interval]:
    """Per-case difference (mine − theirs) of ``metric``, each side first averaged over its seeds, on the test
    cases both have a value for, and the interval of its mean. mine/theirs: long tables with case_id, seed and
    ``metric``. pair_seeds (default: ``seeds_paired``): the interval of the cases × seeds table of differences
    (same seed on both sides; module docstring); otherwise ``case_seed_interval`` with signs (+1, −1): cases paired,
    each side's seeds on their own."""
    a, b = paired_tables(mine, theirs, metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = np.nanmean(a, axis=1) - np.nanmean(b, axis=1)
    pair = seeds_paired(mine, theirs) if pair_seeds is None else pair_seeds
    if pair and a.shape[1] != b.shape[1]:
        raise ValueError("paired_case_difference: pair_seeds needs the same seeds on both sides")
    ci = (case_seed_interval([a - b], confidence=confidence) if pair
          else case_seed_interval([a, b], (1, -1), confidence=confidence))
    return d[np.isfinite(d)], ci


def reference_run(runs: pd.DataFrame, n_real: int) -> pd.Series | None:
    """The real-only configuration a mix is compared with: same n_real if there is one, else the largest."""
    real = runs[(runs["n_synth"].astype(int) == 0) & (runs["n_real"].astype(int) > 0)]
    if real.empty:
        return None
    same = real[real["n_real"].astype(int) == int(n_real)]
    pick = same if len(same) else real[real["n_real"].astype(int) == real["n_real"].astype(int).max()]
    return pick.iloc[0]


def _rows_of(per_case: pd.DataFrame, run: pd.Series) -> pd.DataFrame:
    return per_case[(per_case[list(RUN_KEYS)] == run[list(RUN_KEYS)].values).all(axis=1)]


PAIRED_COLUMNS = (*RUN_KEYS, "region", "reference_mix", "n_pairs", "n_seeds", "n_seeds_reference", "delta_mean",
                  "delta_se", "delta_df", "delta_ci_low", "delta_ci_high", "p_value", "frac_improved", "seeds_paired")


def paired_vs_real(per_case: pd.DataFrame, *, metric: str = "dice", confidence: float = 0.95) -> pd.DataFrame:
    """Paired difference (mix − real only) of ``metric`` per test case, with its interval over test cases and
    each side's segmenter seeds (``case_seed_interval``) and the two-sided p-value of that t interval.

    Pairing: same backend, test set, region and test case; each side is first averaged over its seeds.
    The reference is the real-only mix with the same n_real, else the real-only mix with most real cases.
    Returns PAIRED_COLUMNS; frac_improved: share of cases where the mix is better (lower HD95 is better).
    """
    runs = per_case[list(RUN_KEYS)].drop_duplicates()
    rows = []
    for _, run in mix_order(runs).iterrows():
        same_ctx = runs[(runs["backend"] == run["backend"]) & (runs["test_set"] == run["test_set"])]
        ref = reference_run(same_ctx, run["n_real"])
        if ref is None or (ref[list(RUN_KEYS)] == run[list(RUN_KEYS)]).all():
            continue
        mine, theirs = _rows_of(per_case, run), _rows_of(per_case, ref)
        for region in mine["region"].unique():
            m, t = mine[mine["region"] == region], theirs[theirs["region"] == region]
            d, ci = paired_case_difference(m, t, metric, confidence=confidence)
            better = d > 0 if metric == "dice" else d < 0
            rows.append({**{k: run[k] for k in RUN_KEYS}, "region": region, "reference_mix": ref["mix"],
                         "n_pairs": int(len(d)), "n_seeds": int(m["seed"].nunique()),
                         "n_seeds_reference": int(t["seed"].nunique()), "delta_mean": ci.estimate,
                         "delta_se": ci.se, "delta_df": ci.df, "delta_ci_low": ci.low, "delta_ci_high": ci.high,
                         "p_value": ci.p_value(), "frac_improved": float(better.mean()) if len(d) else float("nan"),
                         "seeds_paired": seeds_paired(m, t)})
    return pd.DataFrame(rows, columns=list(PAIRED_COLUMNS))


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error control); NaN entries stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=float)
    out = np.full_like(p, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    order = ok[np.argsort(p[ok], kind="stable")]
    m = len(order)
    out[order] = np.minimum(np.maximum.accumulate((m - np.arange(m)) * p[order]), 1.0)
    return out


def label_families(paired: pd.DataFrame, *, primary_region: str, primary_test_set: str) -> pd.DataFrame:
    """paired (``paired_vs_real``) with columns family ('primary': every mix vs real only on the primary region
    and test set, all back ends; 'secondary': the rest) and p_holm (Holm-adjusted within its family)."""
    out = paired.copy()
    is_primary = (out["region"] == primary_region) & (out["test_set"].astype(str) == str(primary_test_set))
    out["family"] = np.where(is_primary, "primary", "secondary")
    out["p_holm"] = np.nan
    for fam in ("primary", "secondary"):
        sel = out["family"] == fam
        out.loc[sel, "p_holm"] = holm(out.loc[sel, "p_value"].to_numpy())
    return out


# ------------------------------------------------------------------------------------------ power

class VarianceComponents(NamedTuple):
    """Variances of one metric on one region: ``case`` of the per-case difference between two mixes (case × mix;
    the case's own difficulty cancels in the pairing), ``seed`` of a trained segmenter's mean (per mix), and
    ``residual`` (case × seed: one test case's score across seeds, beyond the segmenter's mean). With seeds paired
    across mixes: ``seed_diff`` and ``residual_diff``, the same two of the cases × seeds table of differences (what
    the mixes' segmenters of one seed do not share); NaN when not measured."""

    case: float
    seed: float
    residual: float
    seed_diff: float = float("nan")
    residual_diff: float = float("nan")


def design_variance(vc: VarianceComponents, n_cases: int, n_seeds: int, *, paired: bool = False
                    ) -> tuple[float, float]:
    """(variance, Satterthwaite df) of the paired Δ of two mixes with n_seeds seeds each on n_cases test cases,
    the expected values of the terms ``case_seed_interval`` estimates; paired: the seeds paired across the mixes
    (``paired_case_difference`` with pair_seeds), from vc.seed_diff and vc.residual_diff."""
    n, k = int(n_cases), int(n_seeds)
    if n < 2 or k < 2:
        raise ValueError("design_variance: needs at least 2 test cases and 2 seeds per mix")
    if paired:  # one table of differences: case + seed + residual terms of case_seed_interval
        if not (np.isfinite(vc.seed_diff) and np.isfinite(vc.residual_diff)):
            raise ValueError("design_variance: paired needs seed_diff and residual_diff")
        a_case = (vc.case + vc.residual_diff / k) / n
        a_seeds = (vc.seed_diff + vc.residual_diff / n) / k
        a_resid = vc.residual_diff / (n * k)
        var = a_case + a_seeds - a_resid
        denom = a_case ** 2 / (n - 1) + a_seeds ** 2 / (k - 1) + a_resid ** 2 / ((n - 1) * (k - 1))
        df = var ** 2 / denom if denom > 0 else float("inf")
        return var, (min(df, k - 1) if a_seeds > a_case else df)  # the interval's df cap (_interval)
    a_case = (vc.case + 2 * vc.residual / k) / n
    a_seeds = (vc.seed + vc.residual / n) / k          # each mix
    a_resid = vc.residual / (n * k)                     # subtracted, each mix
    var = a_case + 2 * (a_seeds - a_resid)
    denom = a_case ** 2 / (n - 1) + 2 * a_seeds ** 2 / (k - 1) + 2 * a_resid ** 2 / ((n - 1) * (k - 1))
    return var, (var ** 2 / denom if denom > 0 else float("inf"))


PAIRED_SIMULATION_CELLS = 1000  # cases × seeds up to which the paired MDE is simulated (4000 tables: <= 32 MB)


def min_detectable_delta(vc: VarianceComponents, n_cases: int, n_seeds: int, *, alpha: float = 0.05,
                         power: float = 0.8, paired: bool | None = None) -> float:
    """The smallest true Δ that the two-sided test at ``alpha`` detects with probability ``power``:
    (t_{1−α/2, ν} + t_{power, ν}) · se, with se and ν of ``design_variance`` (the usual t-test approximation;
    checked against simulated studies in tests/test_eval_calibration.py). paired (default: whether vc has the
    seed-paired components): seeds paired across the mixes; the Δ is then found on 4000 simulated difference tables
    of the design (``paired_mde_simulated``), as the t approximation misjudges the interval's capped df."""
    from scipy.stats import t

    if paired is None:
        paired = bool(np.isfinite(vc.seed_diff) and np.isfinite(vc.residual_diff))
    if paired and int(n_cases) * int(n_seeds) <= PAIRED_SIMULATION_CELLS:
        return paired_mde_simulated(vc, n_cases, n_seeds, alpha=alpha, power=power)
    # larger designs (planning up to 1000 cases × many seeds): the t approximation, whose capped df matter little
    # there; simulating them would take gigabytes per call
    var, df = design_variance(vc, n_cases, n_seeds, paired=paired)
    df = min(df, 1e9)
    return float((t.ppf(1 - alpha / 2, df) + t.ppf(power, df)) * np.sqrt(var))


def paired_mde_simulated(vc: VarianceComponents, n_cases: int, n_seeds: int, *, alpha: float = 0.05,
                         power: float = 0.8, n_studies: int = 4000, seed: int = 0) -> float:
    """The seed-paired design's minimum detectable Δ: Gaussian cases × seeds tables of differences with the
    components vc.case, vc.seed_diff and vc.residual_diff, each given ``case_seed_interval`` (the report's interval);
    the Δ whose shift makes ``power`` of them exclude 0, by bisection on the same tables. Same seed, same value."""
    n, k = int(n_cases), int(n_seeds)
    if n < 2 or k < 2:
        raise ValueError("paired_mde_simulated: needs at least 2 test cases and 2 seeds per mix")
    rng = np.random.default_rng(seed)
    d = (rng.normal(0, np.sqrt(vc.case), (n_studies, n, 1)) + rng.normal(0, np.sqrt(vc.seed_diff), (n_studies, 1, k))
         + rng.normal(0, np.sqrt(vc.residual_diff), (n_studies, n, k)))
    ci = case_seed_interval([d], confidence=1 - alpha)
    half = (ci.high - ci.low) / 2
    lo, hi = 0.0, float(np.quantile(half, power) * 4 + 1e-9)
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if np.mean(np.abs(ci.estimate + mid) > half) >= power else (mid, hi)
    return hi


def variance_components(per_case: pd.DataFrame, *, metric: str = "dice") -> pd.DataFrame:
    """Measured variance components per (backend, test set, region): the mean over the study's mixes of each mix's
    seed component and case × seed residual, and the mean over its comparisons with real only of the case × mix
    component (moment estimates floored at 0, as in ``case_seed_interval``) and, where every comparison's seeds
    pair up (``seeds_paired``), of the seed component and residual of the table of differences. Columns backend,
    test_set, region, n_cases, n_seeds (the fewest of any mix), case_var, seed_var, residual_var, seed_diff_var,
    residual_diff_var (NaN unless seeds pair up in every comparison)."""
    rows = []
    for (backend, test_set, region), g in per_case.groupby(["backend", "test_set", "region"], sort=False):
        runs = g[list(RUN_KEYS)].drop_duplicates()
        seed_vars, resids, case_vars, seed_diffs, resid_diffs, all_paired = [], [], [], [], [], True
        for _, run in runs.iterrows():
            tab = _case_by_seed(_rows_of(g, run), metric).dropna().to_numpy(dtype=float)
            if tab.shape[0] >= 2 and tab.shape[1] >= 2:
                _, mse, seed_var = _seed_component(tab)
                seed_vars.append(float(seed_var))
                resids.append(float(mse))
            ref = reference_run(runs, run["n_real"])
            if ref is None or (ref[list(RUN_KEYS)] == run[list(RUN_KEYS)]).all():
                continue
            mine, theirs = _rows_of(g, run), _rows_of(g, ref)
            if seeds_paired(mine, theirs):  # the difference table's own residual (shared noise cancels)
                vc = paired_design_components(mine, theirs, metric)
                if vc is not None:
                    seed_diffs.append(vc.seed_diff)
                    resid_diffs.append(vc.residual_diff)
                    case_vars.append(vc.case)
                continue
            all_paired = False
            a, b = paired_tables(mine, theirs, metric)
            full = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
            a, b = a[full], b[full]
            if len(a) >= 2 and a.shape[1] >= 2 and b.shape[1] >= 2:
                d_var = (a.mean(axis=1) - b.mean(axis=1)).var(ddof=1)
                resid_part = _seed_component(a)[1] / a.shape[1] + _seed_component(b)[1] / b.shape[1]
                case_vars.append(max(float(d_var - resid_part), 0.0))
        if not seed_vars or not case_vars:
            continue
        rows.append({"backend": backend, "test_set": test_set, "region": region,
                     "n_cases": int(g["case_id"].nunique()), "n_seeds": int(g.groupby("mix")["seed"].nunique().min()),
                     "case_var": float(np.mean(case_vars)), "seed_var": float(np.mean(seed_vars)),
                     "residual_var": float(np.mean(resids)),
                     "seed_diff_var": float(np.mean(seed_diffs)) if all_paired and seed_diffs else float("nan"),
                     "residual_diff_var": float(np.mean(resid_diffs)) if all_paired and resid_diffs else float("nan")})
    return pd.DataFrame(rows, columns=["backend", "test_set", "region", "n_cases", "n_seeds", "case_var", "seed_var",
                                       "residual_var", "seed_diff_var", "residual_diff_var"])


def ratio_interval(num: np.ndarray, den: np.ndarray, *, confidence: float = 0.95) -> Interval:
    """Interval of mean(num) / mean(den) (two cases × seeds tables on the same test cases, seeds independent):
    the delta method on  mean(num) − R · mean(den) , whose variance ``case_seed_interval`` estimates with signs
    (1, −R) at the estimated ratio R; its se / mean(den) is the ratio's se, with the same df."""
    from scipy.stats import t

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        m_num, m_den = np.nanmean(np.nanmean(num, axis=1)), np.nanmean(np.nanmean(den, axis=1))
    if not (np.isfinite(m_num) and np.isfinite(m_den)) or m_den <= 0:
        nan = float("nan")
        return Interval(nan, nan, nan, nan, nan)
    ratio = float(m_num / m_den)
    lin = case_seed_interval([num, den], (1, -ratio), confidence=confidence)
    se = lin.se / m_den
    half = float(t.ppf(0.5 + confidence / 2, min(lin.df, 1e9)) * se) if se > 0 else 0.0
    return Interval(ratio, float(se), lin.df, ratio - half, ratio + half)


def paired_vs_first(runs: list[str], scores: dict, seeds: list[int], margin: float,
                    regions=("WT", "TC", "ET")) -> pd.DataFrame:
    """Each run's Dice minus the first run's (the reference, e.g. DDPM-250), per region, paired by test case, with
    the study's interval (``paired_case_difference``: cases paired, and seeds paired when every run has the same
    seeds, since a seed gives the same initial weights and data order on any samples: decisions/0016).
    scores[(run, seed)]: a per-case table with case_id, region and dice.
    'non-inferior' = the 95 % interval's lower end is above -margin; 'equivalent' = the whole interval lies within
    +-margin (both at least as strict as the one-sided 2.5 % tests).
    Two more columns say what the design could decide: 'shown at margin', the smallest margin this interval is
    non-inferior at (-ci_low, 0 when the interval lies above 0); 'detectable margin', the smallest margin at which a
    run no worse than the reference (true Δ 0) comes out non-inferior with 80 % power in this design (its cases and
    seeds, the variance components measured in its own table of differences: ``paired_design_components``, then
    ``min_detectable_delta``); NaN without paired seeds."""

    def long(run: str, region: str) -> pd.DataFrame:
        table = pd.concat(scores[(run, s)].assign(seed=s) for s in seeds)
        return table[table["region"] == region]

    out = []
    for run in runs[1:]:
        for region in regions:
            mine, ref = long(run, region), long(runs[0], region)
            d, ci = paired_case_difference(mine, ref)
            vc = paired_design_components(mine, ref)
            detectable = (min_detectable_delta(vc, len(d), len(seeds), paired=True) if vc is not None
                          else float("nan"))
            out.append({"run": run, "vs": runs[0], "region": region, "n_cases": len(d),
                        "n_seeds": len(seeds), "delta": round(float(d.mean()), 3),
                        "ci_low": round(ci.low, 3), "ci_high": round(ci.high, 3),
                        f"non-inferior (margin {margin})": bool(ci.low > -margin),
                        f"equivalent (+-{margin})": bool(ci.low > -margin and ci.high < margin),
                        "shown at margin": round(max(-ci.low, 0.0), 3),
                        "detectable margin": round(detectable, 3)})
    return pd.DataFrame(out)


def paired_design_components(mine: pd.DataFrame, theirs: pd.DataFrame, metric: str = "dice"
                             ) -> VarianceComponents | None:
    """The variance components of one seed-paired comparison's cases × seeds table of differences (mine − theirs,
    complete cases only), as ``variance_components`` measures them for a study: the case component (the per-case
    mean difference's variance less the residual's share, floored at 0), seed_diff and residual_diff; None unless
    the seeds pair up and the table has at least 2 cases and 2 seeds."""
    if not seeds_paired(mine, theirs):
        return None
    a, b = paired_tables(mine, theirs, metric)
    full = np.isfinite(a).all(axis=1) & np.isfinite(b).all(axis=1)
    diff = (a - b)[full]
    if diff.shape[0] < 2 or diff.shape[1] < 2:
        return None
    _, resid, seed = _seed_component(diff)
    case = max(float(diff.mean(axis=1).var(ddof=1) - resid / diff.shape[1]), 0.0)
    nan = float("nan")
    return VarianceComponents(case=case, seed=nan, residual=nan, seed_diff=float(seed), residual_diff=float(resid))

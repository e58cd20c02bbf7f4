"""Aggregation of per-case scores: mean ± sd over cases and seeds, seeded bootstrap 95 % CIs, and the paired
comparison of every training mix with real-only data (paired by test case; ``paired_vs_first``: of runs with a
reference run, as in bench.bench_sampler_table).

Two sources of noise: which test cases were drawn, and which segmenter seeds were trained. The point estimate is
the mean over test cases of each case's mean over seeds. Its CI is a two-level bootstrap (``case_seed_ci``): each
resample draws test cases with replacement (shared by the two sides of a paired difference, so pairing by case is
kept) and, independently for each mix, that mix's segmenter seeds with replacement. A bootstrap over cases alone
treats the trained segmenters as fixed, so with 8 real training cases one unlucky real-only seed could make a
difference "significant" in one seed set and reverse in the next. With one seed per mix it reduces to
the bootstrap over cases. ``sd`` is over every (case, seed) value and ``sd_seeds`` is the spread of the per-seed
means (training noise).
Bootstrap: percentile method, seeded (BCa is undefined for the constant samples that perfect Dice produces).
``bootstrap_ci`` (one level, scipy.stats.bootstrap) serves samples without seeds; the two-level resampling is
written here because scipy's bootstrap resamples one level only.
"""
from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
import pandas as pd

# columns that identify one training configuration in results/per_case.csv
RUN_KEYS = ("mix", "n_real", "n_synth", "backend", "test_set")
METRICS = ("dice", "hd95")


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


def _case_means(g: pd.DataFrame, metric: str) -> pd.Series:
    """Mean over seeds for each test case."""
    return g.groupby("case_id")[metric].mean()


def _case_by_seed(g: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Test cases × seeds table of ``metric`` (mean if a (case, seed) appears twice; NaN where one is missing)."""
    return g.pivot_table(index="case_id", columns="seed", values=metric, aggfunc="mean", dropna=False)


def case_seed_ci(tables, signs=None, *, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
                 chunk: int = 250) -> tuple[float, float]:
    """Two-level percentile bootstrap CI of  Σ_k sign_k · mean over cases of (mean over seeds of tables[k]).

    tables: 2-D arrays, cases × seeds, rows in the same case order (the cases are paired across tables); each may
    have its own seeds. Every resample draws the case rows once for all tables and each table's seed columns on
    their own (seeds of different mixes train on different data: they are not paired). NaN entries (a missing
    (case, seed)) are skipped in the means. signs: default +1 each; (+1, −1) gives a paired difference.
    Same seed -> same CI. Fewer than 2 cases with a value: (nan, nan); no variation at all: (v, v).
    """
    tables = [np.asarray(t, dtype=float) for t in tables]
    signs = [1.0] * len(tables) if signs is None else [float(x) for x in signs]
    if len({t.shape[0] for t in tables}) != 1 or len(signs) != len(tables) or any(t.ndim != 2 for t in tables):
        raise ValueError("case_seed_ci: tables must be 2-D with the same cases (rows), one sign per table")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows: a case without a value
        per_case = sum(sg * np.nanmean(t, axis=1) for sg, t in zip(signs, tables))
        keep = np.isfinite(per_case)
        tables = [t[keep] for t in tables]
        n = int(keep.sum())
        if n < 2:
            return float("nan"), float("nan")
        if all(np.nanmax(t) == np.nanmin(t) for t in tables):
            v = float(per_case[keep].mean())
            return v, v
        rng = np.random.default_rng(seed)
        stats = []
        for start in range(0, n_resamples, chunk):
            b = min(chunk, n_resamples - start)
            rows = rng.integers(0, n, size=(b, n))
            total = np.zeros((b, n))
            for sg, t in zip(signs, tables):
                cols = rng.integers(0, t.shape[1], size=(b, t.shape[1]))
                drawn = t[rows[:, :, None], cols[:, None, :]]            # (b, n cases, k seeds)
                total += sg * np.nanmean(drawn, axis=2)
            stats.append(np.nanmean(total, axis=1))
        stats = np.concatenate(stats)
    alpha = (1 - confidence) / 2
    lo, hi = np.nanquantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)


def aggregate(per_case: pd.DataFrame, *, metrics=METRICS, seed: int = 0, n_resamples: int = 2000) -> pd.DataFrame:
    """Mean ± sd over cases and seeds with a bootstrap CI over cases and seeds, per (mix, backend, test set,
    region).

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
            row[f"{m}_mean"] = float(_case_means(g, m).mean())
            row[f"{m}_sd"] = float(vals.std(ddof=1)) if vals.notna().sum() > 1 else float("nan")
            seed_means = g.groupby("seed")[m].mean()
            row[f"{m}_sd_seeds"] = float(seed_means.std(ddof=1)) if len(seed_means) > 1 else float("nan")
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = case_seed_ci([_case_by_seed(g, m).to_numpy()], seed=seed,
                                                                   n_resamples=n_resamples)
        rows.append(row)
    out = pd.DataFrame(rows)
    return mix_order(out).reset_index(drop=True) if len(out) else out


def paired_case_difference(mine: pd.DataFrame, theirs: pd.DataFrame, metric: str = "dice", *, seed: int = 0,
                           n_resamples: int = 2000) -> tuple[np.ndarray, float, float]:
    """Per-case difference (mine − theirs) of ``metric``, each side first averaged over its seeds, on the test
    cases both have a value for, and the two-level bootstrap CI of its mean (``case_seed_ci``: cases resampled in
    pairs, each side's seeds on their own). mine/theirs: long tables with case_id, seed and ``metric``."""
    a, b = _case_by_seed(mine, metric), _case_by_seed(theirs, metric)
    common = a.index.intersection(b.index)
    a, b = a.loc[common].to_numpy(dtype=float), b.loc[common].to_numpy(dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        d = np.nanmean(a, axis=1) - np.nanmean(b, axis=1)
    paired_rows = np.isfinite(d)
    lo, hi = case_seed_ci([a[paired_rows], b[paired_rows]], (1, -1), seed=seed, n_resamples=n_resamples)
    return d[paired_rows], lo, hi


def reference_run(runs: pd.DataFrame, n_real: int) -> pd.Series | None:
    """The real-only configuration a mix is compared with: same n_real if there is one, else the largest."""
    real = runs[(runs["n_synth"].astype(int) == 0) & (runs["n_real"].astype(int) > 0)]
    if real.empty:
        return None
    same = real[real["n_real"].astype(int) == int(n_real)]
    pick = same if len(same) else real[real["n_real"].astype(int) == real["n_real"].astype(int).max()]
    return pick.iloc[0]


def paired_vs_real(per_case: pd.DataFrame, *, metric: str = "dice", seed: int = 0,
                   n_resamples: int = 2000) -> pd.DataFrame:
    """Paired difference (mix − real only) of ``metric`` per test case, with a two-level bootstrap CI over test
    cases and each side's segmenter seeds (``case_seed_ci``).

    Pairing: same backend, test set, region and test case; each side is first averaged over its seeds.
    The reference is the real-only mix with the same n_real, else the real-only mix with most real cases.
    Returns columns RUN_KEYS + region, reference_mix, n_pairs, delta_mean, delta_ci_low, delta_ci_high,
    frac_improved (share of cases where the mix is better), p_wilcoxon (two-sided signed-rank over the per-case
    differences, seeds averaged: it treats the trained segmenters as fixed; NaN if < 2 pairs or all differences 0).
    """
    from scipy.stats import wilcoxon

    runs = per_case[list(RUN_KEYS)].drop_duplicates()
    rows = []
    for _, run in mix_order(runs).iterrows():
        same_ctx = runs[(runs["backend"] == run["backend"]) & (runs["test_set"] == run["test_set"])]
        ref = reference_run(same_ctx, run["n_real"])
        if ref is None or (ref[list(RUN_KEYS)] == run[list(RUN_KEYS)]).all():
            continue
        sel = lambda r: per_case[(per_case[list(RUN_KEYS)] == r[list(RUN_KEYS)].values).all(axis=1)]  # noqa: E731
        mine, theirs = sel(run), sel(ref)
        for region in mine["region"].unique():
            d, lo, hi = paired_case_difference(mine[mine["region"] == region], theirs[theirs["region"] == region],
                                               metric, seed=seed, n_resamples=n_resamples)
            better = d > 0 if metric == "dice" else d < 0  # lower HD95 is better
            p = float("nan")
            if len(d) >= 2 and np.any(d != 0):
                p = float(wilcoxon(d).pvalue)
            rows.append({**{k: run[k] for k in RUN_KEYS}, "region": region, "reference_mix": ref["mix"],
                         "n_pairs": int(len(d)), "delta_mean": float(d.mean()) if len(d) else float("nan"),
                         "delta_ci_low": lo, "delta_ci_high": hi,
                         "frac_improved": float(better.mean()) if len(d) else float("nan"), "p_wilcoxon": p})
    return pd.DataFrame(rows, columns=[*RUN_KEYS, "region", "reference_mix", "n_pairs", "delta_mean", "delta_ci_low",
                                       "delta_ci_high", "frac_improved", "p_wilcoxon"])


def paired_vs_first(runs: list[str], scores: dict, seeds: list[int], margin: float,
                    regions=("WT", "TC", "ET")) -> pd.DataFrame:
    """Each run's Dice minus the first run's (the reference, e.g. DDPM-250), per region, paired by test case, with
    the study's two-level bootstrap CI (``paired_case_difference``: cases resampled jointly, each run's seeds on
    their own, as the same seed on other samples is a different training). scores[(run, seed)]: a per-case table
    with case_id, region and dice. 'non-inferior' = the CI's lower end is above -margin; 'equivalent' = the whole
    CI lies within +-margin."""

    def long(run: str, region: str) -> pd.DataFrame:
        table = pd.concat(scores[(run, s)].assign(seed=s) for s in seeds)
        return table[table["region"] == region]

    out = []
    for run in runs[1:]:
        for region in regions:
            d, lo, hi = paired_case_difference(long(run, region), long(runs[0], region))
            out.append({"run": run, "vs": runs[0], "region": region, "n_cases": len(d),
                        "n_seeds": len(seeds), "delta": round(float(d.mean()), 3),
                        "ci_low": round(lo, 3), "ci_high": round(hi, 3),
                        f"non-inferior (margin {margin})": bool(lo > -margin),
                        f"equivalent (+-{margin})": bool(lo > -margin and hi < margin)})
    return pd.DataFrame(out)

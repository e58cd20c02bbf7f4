"""The study report: STUDY/report/{results.csv, report.md, report.html, *.png}, rebuilt from files only.

Report inputs (paths relative to STUDY; docs/eval.md "Report inputs" has the full column lists):
- results/per_case.csv   REQUIRED. eval.results.PER_CASE_COLUMNS: run, mix, n_real, n_synth, backend, seed,
                         test_set, case_id, region, dice, hd95 (one row per run x test case x region; hd95 in mm).
- study.json             optional, eval.records.StudyRecord. Shown: parameters (the exact config), hashes,
                         versions, wall_seconds; test_sets[0].name is the primary test set; the other fields
                         are shown as JSON.
- results/synthesis.csv  optional. eval.synthesis.SYNTHESIS_COLUMNS.
- results/memorisation.csv optional. eval.memorisation.MEMORISATION_COLUMNS.
- cohort/data_manifest.csv the real cohort: its ``cohort`` column (phantom-v1 triggers the phantom note) and the
                         real images of the montages.
- synthetic/*/data_manifest.csv synthetic cohorts: montage samples (parent_case_id names the real mask owner).

The results files are written with eval.results (``write_results``, ``evaluate_synthesis``); the figures are
eval.plots. Each section below returns the blocks it adds; ``build_report`` puts them in order.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import InputError
from core.fsutil import atomic_path, atomic_write_text
from cohort.labels import REGIONS

from .memorisation import ANATOMY_NOTE, GAP_METHOD, memorisation_gap, summarise
from .plots import plot_boxplots, plot_dice_by_ratio, plot_memorisation, plot_montage
from .records import StudyRecord
from .results import read_results, real_manifest, synthetic_manifests
from .synthesis import HOLDOUT_POOL
from .stats import (INTERVAL_METHOD, MEAN_REGION, VarianceComponents, aggregate, label_families, min_detectable_delta,
                    mix_kind, mix_order, paired_tables, paired_vs_real, ratio_interval, reference_run,
                    variance_components, with_mean_region)

PHANTOM_COHORT = "phantom-v1"
PHANTOM_NOTE = ("This study used the embedded phantom cohort (phantom-v1): its brain anatomy is real atlas data, "
                "but its tumours and its extra contrasts are simulated. Dice values here test the pipeline, not "
                "clinical performance.")
# the paper's headline gain (README): tumour Dice 0.6675 with 1k real + 2k synthetic cases vs 0.6531 with 1k real
PAPER_EFFECT = 0.014
PAPER_EFFECT_TEXT = "+0.014 tumour Dice: 0.6675 with 1k real + 2k synthetic vs 0.6531 with 1k real only"
DEFAULT_PRIMARY = MEAN_REGION  # StudyParams.primary's default (flows/plan.py)
FIDELITY_METRICS = ("fidelity_frd", "fidelity_frd_real", "fidelity_frd_excess")
FRD_NOTE = ("Radiomics Fréchet distance after the FRD recipe (radiomic features z-scored on the reference set, Fréchet "
            "distance of Gaussian fits), on the feature set named in the feature_extractor column, computed by this "
            "project (pyradiomics does not install from PyPI on Python 3.11): values are not comparable with "
            "published FRDs or FIDs, only with the real-vs-real reference beside them.")


def primary_region(record: StudyRecord | None) -> str:
    """The region of the primary comparison declared in the study's parameters ('mean': mean over WT/TC/ET)."""
    return str((record.parameters if record is not None else {}).get("primary", DEFAULT_PRIMARY))


def _primary_test_set(per_case: pd.DataFrame, record: StudyRecord | None) -> str:
    names = list(dict.fromkeys(per_case["test_set"].astype(str)))
    if record is not None and record.test_sets and record.test_sets[0].name in names:
        return record.test_sets[0].name
    for n in ("default", "test"):
        if n in names:
            return n
    return names[0]


# ------------------------------------------------------------------------------------------ formatting

def _fmt(v, digits=3) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "n/a" if not np.isfinite(f) else f"{f:.{digits}f}"


def _mean_sd_ci(r, m: str, digits=3) -> str:
    s = _fmt(r[f"{m}_mean"], digits)
    if np.isfinite(r[f"{m}_sd"]):
        s += f" ± {_fmt(r[f'{m}_sd'], digits)}"
    if np.isfinite(r[f"{m}_ci_low"]):
        s += f" [{_fmt(r[f'{m}_ci_low'], digits)}, {_fmt(r[f'{m}_ci_high'], digits)}]"
    return s


def _p(v) -> str:
    """' < 0.001' or ' = 0.021' (to follow 'p')."""
    return " < 0.001" if np.isfinite(float(v)) and float(v) < 0.001 else f" = {_fmt(v)}"


def _delta(r) -> str:
    if r is None or not np.isfinite(r["delta_mean"]):
        return "—"
    s = f"{r['delta_mean']:+.3f}"
    if np.isfinite(r["delta_ci_low"]):
        s += f" [{r['delta_ci_low']:+.3f}, {r['delta_ci_high']:+.3f}]"
    return s


# a staged arm's mix label ("A>B": trained on A, then fine-tuned on B; flows/mixes.py), by the kinds of its stages
STAGED_KINDS = {"synthetic only>real only": "synthetic pre-train → real fine-tune"}


def training_data(mix: str, kind: str) -> str:
    """The report's name of a mix's training data: its kind (eval.stats.mix_kind), or for a staged arm "A>B"
    (e.g. "0:1>1:0") what its stages train on, e.g. "synthetic pre-train → real fine-tune"."""
    if ">" not in str(mix):
        return kind
    kinds = []
    for part in str(mix).split(">"):
        r, s_ = (int(x) for x in part.split("@")[0].split(":"))
        kinds.append(mix_kind(r, s_))
    key = ">".join(kinds)
    return STAGED_KINDS.get(key, f"{kinds[0]} pre-train → {kinds[1]} fine-tune")


def dice_table(agg: pd.DataFrame, paired: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """The paper-style table for one (test set, backend): rows = mixes, columns = regions (+ paired Δ for Dice)."""
    regions = [r for r in (*REGIONS, MEAN_REGION) if r in set(agg["region"])]
    runs = mix_order(agg[["mix", "kind", "n_real", "n_synth"]].drop_duplicates())
    rows = []
    for _, run in runs.iterrows():
        a = agg[agg["mix"] == run["mix"]].set_index("region")
        row = {"training data": training_data(run["mix"], run["kind"]), "mix": run["mix"], "real": int(run["n_real"]),
               "synthetic": int(run["n_synth"]),
               "cases × seeds": f"{int(a['n_cases'].iloc[0])} × {int(a['n_seeds'].iloc[0])}"}
        for reg in regions:
            row[f"{reg} {metric}"] = _mean_sd_ci(a.loc[reg], metric) if reg in a.index else "—"
        if metric == "dice":
            p = paired[paired["mix"] == run["mix"]].set_index("region") if len(paired) else pd.DataFrame()
            for reg in regions:
                row[f"Δ{reg} vs real only"] = _delta(p.loc[reg]) if reg in p.index else "—"
        rows.append(row)
    return pd.DataFrame(rows)


def to_markdown(df: pd.DataFrame) -> str:
    """Minimal GitHub-markdown table (no tabulate dependency)."""
    cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(cell(c) for c in df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def _round(df: pd.DataFrame, digits=4) -> pd.DataFrame:
    return df.apply(lambda c: c.map(lambda v: _fmt(v, digits)) if pd.api.types.is_float_dtype(c) else c)


# ------------------------------------------------------------------------------------------ the report

class _Blocks:
    """Report content as markdown and HTML side by side; a section returns one, the report joins them (+=)."""

    def __init__(self):
        self.md: list[str] = []
        self.html: list[str] = []

    def __iadd__(self, other: "_Blocks") -> "_Blocks":
        self.md += other.md
        self.html += other.html
        return self

    def h(self, text: str, level: int = 2):
        self.md += [f"{'#' * level} {text}", ""]
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def p(self, text: str, strong: bool = False):
        self.md += [f"**{text}**" if strong else text, ""]
        t = html.escape(text)
        self.html.append(f"<p><strong>{t}</strong></p>" if strong else f"<p>{t}</p>")

    def table(self, df: pd.DataFrame):
        self.md += [to_markdown(df), ""]
        self.html.append(df.to_html(index=False, escape=True, na_rep="n/a", border=0, classes="t"))

    def image(self, path: Path, alt: str):
        self.md += [f"![{alt}]({path.name})", ""]
        b64 = base64.b64encode(path.read_bytes()).decode("ascii")
        self.html.append(f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}"/></p>')

    def code(self, text: str):
        self.md += ["```", text, "```", ""]
        self.html.append(f"<pre>{html.escape(text)}</pre>")


class _Doc(_Blocks):
    """The whole report: a title, the sections' blocks, and the HTML page around them."""

    def __init__(self, title: str):
        super().__init__()
        self.md = [f"# {title}", ""]
        self.html = [f"<h1>{html.escape(title)}</h1>"]

    def render_html(self) -> str:
        style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                 "table.t{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
                 "table.t td,table.t th{border:1px solid #bbb;padding:3px 6px;text-align:left}"
                 "pre{background:#f4f4f4;padding:0.6em;overflow-x:auto;font-size:0.8em}img{max-width:100%}")
        return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>Study report</title>'
                f"<style>{style}</style></head><body>\n" + "\n".join(self.html) + "\n</body></html>\n")


def _segmentation_section(per_case: pd.DataFrame, paired: pd.DataFrame, test_set: str, out: Path,
                          primary: bool) -> tuple[_Blocks, pd.DataFrame]:
    """Dice and HD95 tables and plots of one test set; also its rows of report/results.csv. per_case has the
    'mean' region; paired: ``label_families(paired_vs_real(...))`` of every test set."""
    doc = _Blocks()
    pc = per_case[per_case["test_set"].astype(str) == test_set]
    agg = aggregate(pc)
    paired = paired[paired["test_set"].astype(str) == test_set]
    # the run's own seed count is aggregate's n_seeds already; the paired table adds the reference's
    results = agg.merge(paired.drop(columns=["n_seeds"]), how="left",
                        on=["mix", "n_real", "n_synth", "backend", "test_set", "region"])
    slug = "" if primary else "_" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in test_set)
    doc.h(f"Dice by training mix — test set '{test_set}'" + ("" if primary else " (external)"))
    staged = [m for m in dict.fromkeys(agg["mix"].astype(str)) if ">" in m]
    doc.p("Rows: training mixes (real only, synthetic only, real + synthetic at each ratio" +
          (f"; {', '.join(staged)}: trained on the first mix, then fine-tuned from those weights on the second, "
           "with the same budget and seed as real only (its 'synthetic' column counts the pre-training pool)"
           if staged else "") + "). Cells: mean ± sd over "
          "test cases and seeds [95 % interval over test cases and segmenter seeds]. Δ: paired difference with the "
          "real-only mix, per test case, seeds averaged per case [95 % interval, unadjusted for multiplicity]. "
          f"Intervals: {INTERVAL_METHOD}. 'mean': the mean of WT, TC and ET per test case. Empty regions: both "
          "empty → Dice 1, HD95 0; one empty → Dice 0, HD95 = image diagonal.")
    for be in dict.fromkeys(agg["backend"]):
        doc.h(f"Segmenter backend: {be}", 3)
        doc.table(dice_table(agg[agg["backend"] == be], paired[paired["backend"] == be] if len(paired) else paired))
        doc.p("HD95 (mm):")
        doc.table(dice_table(agg[agg["backend"] == be], paired.iloc[0:0], metric="hd95"))
    doc.image(plot_dice_by_ratio(agg, out / f"dice_by_ratio{slug}.png", test_set), f"Dice by mix ({test_set})")
    doc.image(plot_boxplots(pc, out / f"dice_boxplots{slug}.png", test_set), f"Dice per case ({test_set})")
    return doc, results


def _verdict(r) -> str:
    lo, hi, p_holm = float(r["delta_ci_low"]), float(r["delta_ci_high"]), float(r["p_holm"])
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return "too few test cases for an interval"
    if np.isfinite(p_holm) and p_holm < 0.05:
        return f"significantly {'better' if r['delta_mean'] > 0 else 'worse'} than real only (Holm-adjusted p < 0.05)"
    if lo > 0 or hi < 0:
        return "not significant after the Holm adjustment (the unadjusted 95 % interval excludes 0)"
    return "no significant difference detected (the 95 % interval includes 0)"


def findings(paired: pd.DataFrame, mde: dict | None = None) -> list[str]:
    """One sentence per (back end, mix, region, test set) of ``label_families(paired_vs_real(...))``, primary family
    first: the paired Dice difference with real-only data, its unadjusted 95 % interval, its p-value and its
    Holm-adjusted p-value within its family, and the verdict from the adjusted p-value. mde: {(backend, test set,
    region): minimum detectable Δ}, added to a verdict of no significant difference."""
    out = []
    multi = paired["backend"].nunique() > 1 if len(paired) else False
    for fam in ("primary", "secondary"):
        for _, r in paired[paired["family"] == fam].iterrows():
            verdict = _verdict(r)
            detect = (mde or {}).get((r["backend"], str(r["test_set"]), r["region"]))
            if verdict.startswith("no significant") and detect is not None and np.isfinite(detect):
                verdict += f"; this study detects 80 % of the time only a |Δ| of {detect:.3f} or more"
            if min(r["n_seeds"], r["n_seeds_reference"]) < 2:
                verdict += "; one seed on a side: the interval leaves out training noise"
            arm = f" ({training_data(r['mix'], '')})" if ">" in str(r["mix"]) else ""
            who = f"{r['mix']}{arm} ({r['backend']})" if multi else f"{r['mix']}{arm}"
            out.append(f"{fam.capitalize()} — {who}, {r['region']}, test set '{r['test_set']}': Δ Dice "
                       f"{_delta(r)} vs {r['reference_mix']}, p{_p(r['p_value'])}, Holm-adjusted p{_p(r['p_holm'])} — "
                       f"{verdict}.")
    return out


def synthetic_only_ratio(per_case: pd.DataFrame) -> list[str]:
    """'Synthetic only reaches R× [interval] the real-only Dice' per back end, test set and synthetic-only mix,
    per region: the ratio of mean Dice (cases and seeds) with the real-only run of as many real cases as the mix
    has synthetic ones (else the largest), paired by test case, with its 95 % interval (``ratio_interval``: delta
    method, same variance components). The paper's headline: 0.6207 / 0.6531 = 0.95. Empty without both mixes."""
    from .stats import RUN_KEYS

    runs = per_case[list(RUN_KEYS)].drop_duplicates()
    out = []
    for _, run in mix_order(runs).iterrows():
        if mix_kind(run["n_real"], run["n_synth"]) != "synthetic only":
            continue
        ctx = runs[(runs["backend"] == run["backend"]) & (runs["test_set"] == run["test_set"])]
        ref = reference_run(ctx, run["n_synth"])
        if ref is None:
            continue
        sel = lambda r: per_case[(per_case[list(RUN_KEYS)] == r[list(RUN_KEYS)].values).all(axis=1)]  # noqa: E731
        mine, theirs = sel(run), sel(ref)
        parts = []
        for region in (*REGIONS, MEAN_REGION):
            a, b = mine[mine["region"] == region], theirs[theirs["region"] == region]
            if a.empty or b.empty:
                continue
            num, den = paired_tables(a, b, "dice")
            ci = ratio_interval(num, den)
            if np.isfinite(ci.estimate):
                parts.append(f"{region} {np.nanmean(num):.3f}/{np.nanmean(den):.3f} = {ci.estimate:.2f}× "
                             f"[{ci.low:.2f}, {ci.high:.2f}]")
        if parts:
            out.append(f"Synthetic only ({run['mix']}, {int(run['n_synth'])} synthetic cases) vs real only "
                       f"({ref['mix']}, {int(ref['n_real'])} real cases), back end {run['backend']}, test set "
                       f"'{run['test_set']}', mean Dice ratio [95 % interval, delta method]: " + ", ".join(parts) +
                       " (the paper: 0.6207/0.6531 = 0.95×).")
    return out


def _findings_section(per_case: pd.DataFrame, paired: pd.DataFrame, test_set: str, region: str,
                      mde: dict) -> _Blocks:
    doc = _Blocks()
    if len(paired):
        n_primary = int((paired["family"] == "primary").sum())
        doc.h(f"What this study found (test set '{test_set}')")
        seeds = per_case["seed"].nunique()
        what = "mean Dice over WT, TC and ET" if region == MEAN_REGION else f"{region} Dice"
        doc.p(f"Primary comparison (the study parameter 'primary' = '{region}'): each mix vs real only, {what}, on "
              f"test set '{test_set}': {n_primary} comparison{'s' if n_primary != 1 else ''}, Holm-adjusted among "
              f"themselves. Every other Δ (each region, every test set) is secondary: Holm-adjusted over the "
              f"{len(paired) - n_primary} secondary comparisons. Paired per test case, seeds averaged per case "
              f"({seeds} segmenter seed{'s' if seeds != 1 else ''}); intervals: {INTERVAL_METHOD}; unadjusted 95 %. "
              "Significant = Holm-adjusted p < 0.05. In simulated null studies of 12–50 test cases and 3–9 seeds "
              "per mix, this interval excluded 0 in 3–7 % of them at nominal 5 % (about 2 %, conservative, where "
              "one case's score varies across seeds far more than a mix's gain varies across cases; "
              "tests/test_eval_calibration.py). Mixes share one real-only reference, so their Δ are not "
              "independent confirmations of each other.")
        lines = findings(paired, mde)
        if lines and not any(line.startswith("Primary") for line in lines):
            lines.insert(0, f"Primary — no comparison on region '{region}' in test set '{test_set}'.")
        lines += synthetic_only_ratio(per_case[per_case["test_set"].astype(str) == test_set])
        doc.md += [f"- {line}" for line in lines] + [""]
        doc.html.append("<ul>" + "".join(f"<li>{html.escape(line)}</li>" for line in lines) + "</ul>")
    return doc


def power_table(per_case: pd.DataFrame, test_set: str) -> pd.DataFrame:
    """Per back end and region of one test set: the measured variance components (as sd), the design (cases ×
    seeds) and the minimum detectable Δ Dice at 80 % power, two-sided α 0.05 (eval.stats.min_detectable_delta)."""
    vc = variance_components(per_case[per_case["test_set"].astype(str) == test_set])
    rows = []
    for _, r in vc.iterrows():
        # seed-paired components (NaN unless every comparison's seeds pair up): the MDE is then the paired one
        comp = VarianceComponents(r["case_var"], r["seed_var"], r["residual_var"], r["seed_diff_var"],
                                  r["residual_diff_var"])
        mde = min_detectable_delta(comp, r["n_cases"], r["n_seeds"]) if r["n_seeds"] >= 2 else float("nan")
        rows.append({"backend": r["backend"], "region": r["region"],
                     "cases × seeds": f"{int(r['n_cases'])} × {int(r['n_seeds'])}",
                     "seed sd": np.sqrt(r["seed_var"]), "seed-paired sd": np.sqrt(r["seed_diff_var"]),
                     "case × mix sd": np.sqrt(r["case_var"]),
                     "case × seed sd": np.sqrt(r["residual_var"]), "minimum detectable Δ": mde,
                     f"sees the paper's {PAPER_EFFECT:+.3f}": ("n/a" if not np.isfinite(mde) else
                                                               "yes" if mde <= PAPER_EFFECT else "no")})
    return pd.DataFrame(rows)


def _power_section(table: pd.DataFrame, test_set: str) -> _Blocks:
    doc = _Blocks()
    doc.h(f"Power: the smallest Δ this study could detect (test set '{test_set}')")
    if not len(table):
        doc.p("Not estimable: the study needs a real-only mix and another mix with at least 2 seeds and 2 test cases "
              "each.")
        return doc
    doc.p("From the study's own variance components (moment estimates: seed = one trained segmenter's mean, case "
          "× mix = how a mix's per-case gain varies between test cases, case × seed = one case's score across "
          "seeds), the minimum detectable Δ is the true paired difference of two mixes that this design (its test "
          "cases × seeds per mix) calls significant 80 % of the time, two-sided α 0.05, before the Holm "
          "adjustment. A smaller true Δ is more often missed than seen. Where the mixes share their seed numbers "
          "(the same seed: the same initial weights, data order and augmentation in every mix), Δ are analysed "
          "paired by seed; 'seed-paired sd' is then the seed component of a difference of two mixes, and the "
          "minimum detectable Δ is the paired one (found by simulating the design).")
    doc.table(_round(table, 3))
    mde = table["minimum detectable Δ"].to_numpy(dtype=float)
    if np.all(np.isfinite(mde)) and np.all(mde > PAPER_EFFECT):
        doc.p(f"This study was too small to see the paper's effect ({PAPER_EFFECT_TEXT}): its minimum detectable Δ "
              f"is {np.min(mde):.3f}–{np.max(mde):.3f}, {np.min(mde) / PAPER_EFFECT:.0f}× or more that effect. "
              "'No significant difference' here does not mean that there is no difference. "
              "`medddpm plan --detect D` gives the seeds and test cases needed for a Δ of D.", strong=True)
    elif np.any(np.isfinite(mde) & (mde > PAPER_EFFECT)):
        small = ", ".join(f"{r['region']} ({r['backend']})" for _, r in table.iterrows()
                          if np.isfinite(r["minimum detectable Δ"]) and r["minimum detectable Δ"] > PAPER_EFFECT)
        doc.p(f"Too small to see the paper's effect ({PAPER_EFFECT_TEXT}) on: {small}.", strong=True)
    return doc


def _montage_section(study: Path, real: Path | None, out: Path) -> _Blocks:
    doc = _Blocks()
    doc.h("Synthetic images: samples (same mask, real vs synthetic)")
    n_montage = 0
    if real is not None:
        for sid, man in synthetic_manifests(study).items():
            png = plot_montage(real, man, out / f"montage_{sid}.png")
            if png is not None:
                doc.image(png, f"montage {sid}")
                n_montage += 1
    if not n_montage:
        doc.p("No synthetic cohort with a mask owned by a real case of this study was found (STUDY/synthetic/).")
    return doc


def gate_table(study: Path) -> pd.DataFrame:
    """Per synthetic cohort: cases by quality-gate outcome (manifest column quality_gate), the pass rate, draws
    made (quality_report.csv: every attempt) and the checks that failed most often."""
    from cohort.manifest import load_manifest

    rows = []
    for sid, man in synthetic_manifests(study).items():
        df = load_manifest(man)
        gate = df["quality_gate"].fillna("") if "quality_gate" in df.columns else pd.Series([""] * len(df))
        n = len(df)
        judged = int(gate.isin(["pass", "fail"]).sum())
        row = {"synthetic cohort": sid, "cases": n, "passed": int((gate == "pass").sum()),
               "failed (kept)": int((gate == "fail").sum()), "not judged": n - judged,
               "pass rate": _fmt((gate == "pass").sum() / judged) if judged else "n/a", "draws": "",
               "most frequent failed checks": ""}
        report = man.parent / "quality_report.csv"
        if report.exists() and report.stat().st_size:
            rep = pd.read_csv(report)
            row["draws"] = len(rep)
            checks = pd.Series([f.split(":")[0] for text in rep["failures"].dropna().astype(str)
                                for f in text.split("; ") if f])
            top = checks.value_counts().head(3).items()
            row["most frequent failed checks"] = ", ".join(f"{c} ({k})" for c, k in top)
        rows.append(row)
    return pd.DataFrame(rows)


def sampler_table(study: Path) -> pd.DataFrame:
    """Per synthetic cohort: the sampler that made it (the manifest's sampler column, e.g. 'ddim(eta=1)' or
    'distilled-2') with its steps and cases; several values (a cohort resumed with other settings) are listed."""
    from cohort.manifest import load_manifest

    rows = []
    for sid, man in synthetic_manifests(study).items():
        df = load_manifest(man)
        if "sampler" not in df.columns or not len(df):
            continue
        made = df.groupby([df["sampler"].astype(str), df["steps"].astype(str)], sort=True).size()
        for (sampler, steps), n in made.items():
            rows.append({"synthetic cohort": sid, "sampler": sampler, "steps": steps, "cases": int(n)})
    return pd.DataFrame(rows)


def sampler_note(table: pd.DataFrame) -> str:
    """What the samplers of sampler_table are, in one paragraph (a distilled student's network evaluations)."""
    text = ("Which sampler made each synthetic cohort (the manifests' sampler and steps columns). Every sampler "
            "here calls the network once per step, so steps are the network evaluations per drawn volume (the "
            "paper's DDPM: 250).")
    distilled = sorted({s for s in table["sampler"] if s.startswith("distilled-")}) if len(table) else []
    if distilled:
        text += (f" {', '.join(distilled)}: a progressively distilled N-step student of a trained generator "
                 "(medddpm distill, synth.distill; sampled with DDIM at eta 0 on its own N timesteps), "
                 "250 / N times fewer network evaluations than DDPM-250.")
    return text


def _gate_section(study: Path) -> _Blocks:
    doc = _Blocks()
    samplers = sampler_table(study)
    if len(samplers):
        doc.h("Synthetic images: samplers")
        doc.p(sampler_note(samplers))
        doc.table(samplers)
    table = gate_table(study)
    if len(table):
        doc.h("Synthetic images: quality gate")
        doc.p("synth's MAISI-style gate, per case against envelopes learnt from the generator's training cases "
              "(variances moderated toward the pooled spread, so a label seen in one or two training cases gets a "
              "wide but finite range): each tissue label's median intensity and the background per modality; "
              "which modality is which (the correlation and the tumour contrast of each pair of modalities, each "
              "modality's brain 95th percentile), so swapped or copied contrasts fail; and sharpness (a texture "
              "ratio inside the brain that blur lowers and noise or a painted mask raise). Pass rates on real "
              "and corrupted cases: docs/benchmarks.md (gate). A failing sample is redrawn with new seeds; a case "
              "still failing is kept and marked (the study's gate_failures setting decides whether mixes use it).")
        doc.table(table)
    return doc


def fidelity_sentence(synth: pd.DataFrame | None) -> str | None:
    """The held-out fidelity verdict in one sentence (rows FIDELITY_METRICS of results/synthesis.csv), or None."""
    if synth is None or not len(synth):
        return None
    f = synth[synth["metric"].isin(FIDELITY_METRICS)].set_index("metric")
    if not set(FIDELITY_METRICS) <= set(f.index):
        return None
    ci = lambda m: (f"{float(f.loc[m, 'value']):.2f} [{float(f.loc[m, 'ci_low']):.2f}, "  # noqa: E731
                    f"{float(f.loc[m, 'ci_high']):.2f}]")
    lo, hi = float(f.loc["fidelity_frd_excess", "ci_low"]), float(f.loc["fidelity_frd_excess", "ci_high"])
    verdict = ("farther from the held-out real cases than real images are (the excess's 95 % interval lies above 0)"
               if lo > 0 else "nearer to the held-out real cases than the real images of the same masks are (the "
               "excess's interval lies below 0: read as less varied samples, not as better than real)" if hi < 0 else
               "not distinguishable from real images at this sample size (the excess's 95 % interval includes 0; "
               "its width is what this study can resolve)")
    return (f"Fidelity on {int(f.loc['fidelity_frd', 'n'])} held-out masks (radiomics Fréchet distance to other "
            f"held-out real cases, 95 % bootstrap intervals): synthetic {ci('fidelity_frd')}, the real images of the "
            f"same masks {ci('fidelity_frd_real')}, excess {ci('fidelity_frd_excess')} — the samples are {verdict}.")


def _synthesis_section(synth: pd.DataFrame | None) -> _Blocks:
    doc = _Blocks()
    doc.h("Synthesis fidelity and diversity")
    if synth is not None and len(synth):
        fid = synth[synth["metric"].isin(FIDELITY_METRICS)]
        doc.h("Fidelity against held-out real cases", 3)
        sentence = fidelity_sentence(synth)
        if sentence:
            doc.p(sentence, strong=True)
            doc.p("The generator sampled one image on the mask of each of a few real cases it never saw (the held-out "
                  f"pool {HOLDOUT_POOL}; no segmenter trains on it). fidelity_frd: those samples vs other held-out "
                  "real cases; fidelity_frd_real: the real images of the same masks vs the same cases, at the same "
                  "sample sizes (the real-vs-real reference, with the same small-sample bias); fidelity_frd_excess: "
                  "their difference. No network is trained on any case, so no study case shaped the features. "
                  + FRD_NOTE)
            doc.table(_round(fid.drop(columns=["synthetic_id", "region"])))
        else:
            doc.p("Not computed: the study made no held-out pool (too few real cases outside the generator's "
                  "training set, or holdout_masks = 0).")
        doc.p("Paired fidelity (paired_ms_ssim, a separate measure): MS-SSIM of each synthetic image with the real "
              "image that owns its (unedited) mask — how closely a sample reproduces its own patient, not how "
              "realistic the set is. semantic_*: a real-only segmenter applied to synthetic images, scored against "
              "their conditioning masks. ms_ssim_*: mean pairwise MS-SSIM (lower = more diverse), beside the same "
              "on real images. mmd: MONAI MMD between synthetic images and the generator's training cases (no "
              "real-vs-real reference).")
        for sid, g in synth[~synth["metric"].isin(FIDELITY_METRICS)].groupby("synthetic_id", sort=False):
            doc.h(f"Synthetic cohort {sid}", 3)
            doc.table(_round(g.drop(columns=["synthetic_id"]).fillna({"region": ""})))
    else:
        doc.p("Not computed for this study (results/synthesis.csv absent).")
    return doc


def memorisation_sentences(gap: pd.DataFrame) -> list[str]:
    """One sentence per synthetic cohort of memorisation_gap: the owner-similarity gap with its interval."""
    out = []
    for _, r in gap.iterrows():
        if not np.isfinite(r["ci_low"]):
            out.append(f"Memorisation, {r['synthetic_id']}: gap {r['gap']:+.3f}, no interval (fewer than 2 owners on "
                       "a side).")
            continue
        verdict = ("samples on the training masks resemble their owners more than samples on unseen masks do: "
                   "the generator reproduces its training patients beyond what their masks carry"
                   if r["ci_low"] > 0 else "no excess resemblance to the training patients detected"
                   if r["ci_high"] >= 0 else "samples on these masks resemble their owners less than samples on "
                   "unseen masks (as expected where they are edited versions of the training masks)")
        out.append(f"Memorisation, {r['synthetic_id']}: owner similarity {r['owner_similarity_training_masks']:.3f} "
                   f"on the masks of {int(r['n_owners_training'])} training cases vs "
                   f"{r['owner_similarity_heldout_masks']:.3f} on {int(r['n_owners_heldout'])} held-out masks, gap "
                   f"{r['gap']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] (p{_p(r['p_value'])}) — {verdict}.")
    return out


def _memorisation_section(mem: pd.DataFrame | None, out: Path) -> _Blocks:
    doc = _Blocks()
    doc.h("Memorisation and privacy")
    doc.p(ANATOMY_NOTE, strong=True)
    if mem is not None and len(mem):
        gap = memorisation_gap(mem, HOLDOUT_POOL)
        if len(gap):
            for line in memorisation_sentences(gap):
                doc.p(line, strong=True)
            doc.p("The memorisation figure: a sample resembles the patient who owns its mask through the mask itself "
                  "(anatomy) and through what the generator learnt; the baseline is the owner similarity of samples "
                  f"on held-out masks ({HOLDOUT_POOL}: masks of real cases the generator never saw). Method: "
                  f"{GAP_METHOD}. On edited masks the owner similarity is also lowered by the edit, so their gap "
                  "understates memorisation.")
            doc.table(_round(gap, 3))
        else:
            doc.p("No memorisation baseline: the study made no samples on held-out masks, so the owner similarity "
                  "below cannot be read as memorisation.", strong=True)
        doc.p("Descriptives per synthetic cohort: each synthetic image's most similar training image (Pearson "
              "correlation inside the brain, mean over modalities) and its similarity to the real image that owns "
              "its conditioning mask. Copy threshold: calibrated on real test images vs the training images (rule in "
              "the table; it lies between different patients, and samples exceed it through their mask alone, so no "
              "fraction above it is reported). mask_similarity: the owner vs its mask painted with the "
              "owner's mean intensity per label; frac_above_painted_mask: the fraction of samples more similar to "
              "their owner than that — not a memorisation measure (samples on held-out masks are above it too).")
        doc.table(_round(summarise(mem)))
        doc.image(plot_memorisation(mem, out / "memorisation.png", HOLDOUT_POOL), "nearest-neighbour similarity")
    else:
        doc.p("Not computed for this study (results/memorisation.csv absent).")
    return doc


def _reproducibility_section(record: StudyRecord | None) -> _Blocks:
    doc = _Blocks()
    doc.h("Reproducibility: configuration, hashes, versions, wall times")
    meta = record.as_written() if record is not None else {}
    if meta:
        if "parameters" in meta:
            doc.h("Configuration (study parameters, exact)", 3)
            doc.code(json.dumps(meta["parameters"], indent=2, sort_keys=True, default=str))
        for key, title in (("hashes", "Content hashes (sha256)"), ("versions", "Package versions"),
                           ("wall_seconds", "Wall times (s)")):
            if isinstance(meta.get(key), dict):
                doc.h(title, 3)
                doc.table(pd.DataFrame({"item": list(meta[key]), "value": [str(v) for v in meta[key].values()]}))
        rest = {k: v for k, v in meta.items() if k not in ("parameters", "hashes", "versions", "wall_seconds")}
        if rest:
            doc.h("Other study records (study.json)", 3)
            doc.code(json.dumps(rest, indent=2, sort_keys=True, default=str))
    else:
        doc.p("study.json absent: configuration, hashes, versions and wall times unknown.")
    return doc


def student_note(checkpoint: Path) -> str:
    """' It is a distilled N-step student ...' from the card of a generator made by `medddpm distill` (synth.distill):
    distill_card.json beside a run's checkpoint, or the JSON card of the same name beside a shipped student
    (synth.shipped); '' for any other generator. (eval does not import synth: the card is read as JSON.)"""
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    cards = [folder / "distill_card.json"] + ([checkpoint.with_suffix(".json")] if checkpoint.suffix else [])
    c = next((json.loads(f.read_text()) for f in cards if f.is_file()), {})
    if "student_steps" not in c:
        return ""
    rounds = f"{c.get('rounds')} halving round{'' if c.get('rounds') == 1 else 's'}"
    return (f" It is a {c.get('student_steps')}-step student distilled ({c.get('method')}, {rounds} from the "
            f"teacher's DDIM-{c.get('teacher_steps')} at eta 0) from the generator {c.get('teacher')} "
            f"(sha256 {str(c.get('teacher_sha256'))[:12]}…), sampled as {c.get('sampler')}; not fine-tuned on "
            "this study's cases.")


def generator_note(study: Path, record: StudyRecord | None) -> str | None:
    """One paragraph on where the study's Med-DDPM came from and which real cases it saw (from the training run's
    own config.json), or None for a study without synthetic data."""
    params = record.parameters if record is not None else {}
    if record is not None and record.checkpoint is None:
        return None
    if params.get("medddpm_checkpoint"):
        return (f"Med-DDPM: the given checkpoint {params['medddpm_checkpoint']} (not trained by this study; which real "
                "cases it saw is not known here)." + student_note(Path(params["medddpm_checkpoint"])))
    cfg_file = study / "medddpm" / "config.json"
    if not cfg_file.exists():
        return None
    cfg = json.loads(cfg_file.read_text())
    n, steps = len(cfg.get("train_cases", [])), cfg.get("steps")
    seen = ("the study's selected real training cases, the same ones the real-only segmenters train on"
            if params.get("medddpm_on", "selected") == "selected" else "every real training case of the cohort")
    if cfg.get("init_from"):
        card = Path(cfg["init_from"]).with_suffix(".json")
        origin = ""
        if card.exists():
            c = json.loads(card.read_text())
            pc = c.get("pretrain_cohort", {})
            origin = (f", pre-trained for {c.get('steps')} steps on {c.get('train_cases')} phantom training cases "
                      f"drawn with cohort seed {pc.get('seed')} (none of them is a case of this study)")
        return (f"Med-DDPM: fine-tuned for {steps} steps on {n} real cases ({seen}), starting from "
                f"{Path(cfg['init_from']).name}{origin}. The synthetic cases therefore also carry what the generator "
                "learnt from those other phantom cases, as they would from the authors' published BraTS weights.")
    return f"Med-DDPM: trained from scratch for {steps} steps on {n} real cases ({seen})."


def build_report(study_dir: str | Path) -> Path:
    """Build STUDY/report/ from the files listed in this module's docstring; returns the report folder.

    Deterministic: same inputs -> same tables (the intervals are computed, not resampled). Raises InputError
    naming the file if results/per_case.csv is missing or lacks columns.
    """
    study = Path(study_dir)
    out = study / "report"
    per_case = read_results(study, "per_case", required=True)
    synth = read_results(study, "synthesis")
    mem = read_results(study, "memorisation")
    record = StudyRecord.read(study)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):  # plots of a previous build that this one may not redraw (e.g. a removed test set)
        stale.unlink()
    per_case["test_set"] = per_case["test_set"].astype(str)
    per_case["mix"] = per_case["mix"].astype(str)

    doc = _Doc(f"Augmentation study report — {study.name}")
    try:
        real = real_manifest(study)
        from cohort.manifest import load_manifest

        cohorts = sorted(set(load_manifest(real)["cohort"].dropna().astype(str)))
    except InputError:
        real, cohorts = None, []
    doc.p(f"Study folder: {study.resolve()}. Real cohort: {', '.join(cohorts) or 'unknown'}.")
    subset = record.as_written().get("case_list") if record is not None else None
    if subset:
        doc.p(f"Curated subset: the study used only the {subset['n_cases']} real cases listed in {subset['file']} "
              f"(sha256 {subset['sha256']}).")
    if PHANTOM_COHORT in cohorts:
        doc.p(PHANTOM_NOTE, strong=True)
    note = generator_note(study, record)
    if note:
        doc.p(note)

    primary = _primary_test_set(per_case, record)
    region = primary_region(record)
    per_case = with_mean_region(per_case)
    paired = label_families(paired_vs_real(per_case), primary_region=region, primary_test_set=primary)
    power = power_table(per_case, primary)
    mde = {(r["backend"], primary, r["region"]): r["minimum detectable Δ"] for _, r in power.iterrows()}
    doc += _findings_section(per_case, paired, primary, region, mde)
    doc += _power_section(power, primary)
    test_sets = [primary, *(ts for ts in dict.fromkeys(per_case["test_set"]) if ts != primary)]
    sections = [_segmentation_section(per_case, paired, ts, out, ts == primary) for ts in test_sets]
    for blocks, _ in sections:
        doc += blocks
    doc += _montage_section(study, real, out)
    doc += _gate_section(study)
    doc += _synthesis_section(synth)
    doc += _memorisation_section(mem, out)
    doc += _reproducibility_section(record)

    res = pd.concat([rows for _, rows in sections], ignore_index=True)
    with atomic_path(out / "results.csv") as tmp:
        res.to_csv(tmp, index=False)
    atomic_write_text(out / "report.md", "\n".join(doc.md) + "\n")
    atomic_write_text(out / "report.html", doc.render_html())
    return out

"""The study report: STUDY/report/{results.csv, report.md, report.html, *.png}, rebuilt from files only.

Report inputs (paths relative to STUDY; docs/eval.md "Report inputs" has the full column lists):
- results/per_case.csv   REQUIRED. PER_CASE_COLUMNS: run, mix, n_real, n_synth, backend, seed, test_set,
                         case_id, region, dice, hd95 (one row per run x test case x region; hd95 in mm).
- study.json             optional. Read keys: parameters (shown as the exact config), hashes, checkpoint,
                         synthetic, cohort, runs, test_sets (test_sets[0].name is the primary test set),
                         wall_seconds, versions. Other keys are shown as JSON.
- results/synthesis.csv  optional. eval.synthesis.SYNTHESIS_COLUMNS.
- results/memorisation.csv optional. eval.memorisation.MEMORISATION_COLUMNS.
- cohort/data_manifest.csv the real cohort: its ``cohort`` column (phantom-v1 triggers the phantom note) and the
                         real images of the montages.
- synthetic/*/data_manifest.csv synthetic cohorts: montage samples (parent_case_id names the real mask owner).

The flow writes the results files with ``write_results`` (validated, atomic) and may compute the synthesis
and memorisation tables with ``evaluate_synthesis``.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from cohort.errors import CohortError
from cohort.fsutil import atomic_path, atomic_write_text
from cohort.labels import MODALITIES, REGIONS

from .records import StudyRecord
from .memorisation import ANATOMY_NOTE, MEMORISATION_COLUMNS, summarise
from .stats import aggregate, mix_order, paired_vs_real
from .synthesis import SYNTHESIS_COLUMNS

PER_CASE_COLUMNS = ("run", "mix", "n_real", "n_synth", "backend", "seed", "test_set", "case_id", "region", "dice",
                    "hd95")
PHANTOM_COHORT = "phantom-v1"
PHANTOM_NOTE = ("This study used the embedded phantom cohort (phantom-v1): its brain anatomy is real atlas data, "
                "but its tumours and its extra contrasts are simulated. Dice values here test the pipeline, not "
                "clinical performance.")
FID_NOTE = ("The Fréchet distance is computed on features of the network named in the feature_extractor column. "
            "It is not MedicalNet 3-D FID or RadImageNet 2.5-D FID, and its values are not comparable with "
            "published FIDs.")
RESULT_FILES = {"per_case": ("per_case.csv", PER_CASE_COLUMNS), "synthesis": ("synthesis.csv", SYNTHESIS_COLUMNS),
                "memorisation": ("memorisation.csv", MEMORISATION_COLUMNS)}
# the keys that identify a row in each results file (append replaces rows with the same key)
RESULT_KEYS = {"per_case": ("run", "test_set", "case_id", "region"),
               "synthesis": ("synthetic_id", "metric", "region"),
               "memorisation": ("synthetic_id", "kind", "case_id")}


# ------------------------------------------------------------------------------------------ writing inputs

def write_results(study_dir: str | Path, *, per_case: pd.DataFrame | None = None,
                  synthesis: pd.DataFrame | None = None, memorisation: pd.DataFrame | None = None,
                  append: bool = True) -> dict[str, Path]:
    """Write the report's inputs to STUDY/results/ atomically, checking their columns.

    append=True merges with an existing file, new rows replacing old ones with the same key (RESULT_KEYS), so
    a resumed flow can write run by run. Returns {name: path} of the files written.
    """
    out = {}
    for name, df in (("per_case", per_case), ("synthesis", synthesis), ("memorisation", memorisation)):
        if df is None:
            continue
        fname, cols = RESULT_FILES[name]
        path = Path(study_dir) / "results" / fname
        missing = [c for c in cols if c not in df.columns]
        if missing:
            raise CohortError(path, f"{name} table lacks columns {missing} (needs {list(cols)})", kind="bad-results")
        df = df[list(cols)]
        if append and path.exists():
            old = pd.read_csv(path)
            df = pd.concat([old, df], ignore_index=True)
            keys = [k for k in RESULT_KEYS[name] if k in df.columns]
            ident = df[keys].apply(lambda c: c.map(lambda v: "" if pd.isna(v) else str(v)))
            df = df[~ident.duplicated(keep="last")]
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
        out[name] = path
    return out


def evaluate_synthesis(study_dir: str | Path, *, predictions: Mapping[str, Mapping[str, str | Path]] | None = None,
                       segmenter: str = "real-only segmenter",
                       feature_fn: Callable | None = None, feature_extractor: str | None = None,
                       train_ids: list[str] | None = None, max_pairs: int | None = 100, seed: int = 0,
                       rule: str = "max") -> dict[str, Path]:
    """Compute results/synthesis.csv and results/memorisation.csv for every STUDY/synthetic/<id>/ cohort.

    predictions: {synthetic_id: {case_id: predicted label path}} of a real-only segmenter on that cohort
    (semantic consistency; skipped for ids without predictions). feature_fn / feature_extractor: see
    eval.synthesis.synthesis_table. train_ids: the real images Med-DDPM trained on (default: study.json
    cohort.train_case_ids when parameters.medddpm_on == "selected", else every real train case).
    """
    from .memorisation import memorisation_table
    from .synthesis import synthesis_table

    study = Path(study_dir)
    real = _real_manifest(study)
    record = StudyRecord.read(study)
    if train_ids is None and record is not None:
        train_ids = record.generator_train_ids()
    masks = study / "masks" / "data_manifest.csv"
    syn_frames, mem_frames = [], []
    for sid, man in _synthetic_manifests(study).items():
        syn_frames.append(synthesis_table(real, man, synthetic_id=sid, real_case_ids=train_ids,
                                          predictions=(predictions or {}).get(sid), segmenter=segmenter,
                                          feature_fn=feature_fn, feature_extractor=feature_extractor,
                                          max_pairs=max_pairs, seed=seed))
        mem_frames.append(memorisation_table(real, man, synthetic_id=sid, train_ids=train_ids,
                                             masks_manifest=masks if masks.exists() else None, rule=rule))
    if not syn_frames:
        raise CohortError(study / "synthetic", "no synthetic/<id>/data_manifest.csv in the study", kind="missing-file")
    return write_results(study, synthesis=pd.concat(syn_frames, ignore_index=True),
                         memorisation=pd.concat(mem_frames, ignore_index=True))


# ------------------------------------------------------------------------------------------ reading inputs

def _read_table(path: Path, columns, required: bool) -> pd.DataFrame | None:
    if not path.exists():
        if required:
            raise CohortError(path, "missing (the study's flow writes it; see docs/eval.md)", kind="missing-file")
        return None
    df = pd.read_csv(path, keep_default_na=True)
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise CohortError(path, f"lacks columns {missing}", kind="bad-results")
    return df


def _real_manifest(study: Path) -> Path:
    record = StudyRecord.read(study)
    recorded = record.resolve(study, record.cohort.manifest) if record else None
    cand = [recorded] if recorded else []
    cand.append(study / "cohort" / "data_manifest.csv")
    for c in cand:
        if c.exists():
            return c
    raise CohortError(cand[-1], "the study's real cohort manifest is missing", kind="missing-file")


def _synthetic_manifests(study: Path) -> dict[str, Path]:
    return {p.parent.name: p for p in sorted((study / "synthetic").glob("*/data_manifest.csv"))}


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


def _delta(r) -> str:
    if r is None or not np.isfinite(r["delta_mean"]):
        return "—"
    s = f"{r['delta_mean']:+.3f}"
    if np.isfinite(r["delta_ci_low"]):
        s += f" [{r['delta_ci_low']:+.3f}, {r['delta_ci_high']:+.3f}]"
    return s


def dice_table(agg: pd.DataFrame, paired: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """The paper-style table for one (test set, backend): rows = mixes, columns = regions (+ paired Δ for Dice)."""
    regions = [r for r in REGIONS if r in set(agg["region"])]
    runs = mix_order(agg[["mix", "kind", "n_real", "n_synth"]].drop_duplicates())
    rows = []
    for _, run in runs.iterrows():
        a = agg[agg["mix"] == run["mix"]].set_index("region")
        row = {"training data": run["kind"], "mix": run["mix"], "real": int(run["n_real"]),
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


# ------------------------------------------------------------------------------------------ plots

def _figure(nrows: int, ncols: int, figsize):
    """A matplotlib Figure without pyplot: no global backend or figure registry (safe in flow threads)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _savefig(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def plot_dice_by_ratio(agg: pd.DataFrame, path: Path, title: str) -> Path:
    """Mean Dice per mix (paper order) with bootstrap 95 % CI error bars; one panel per backend, one line per region."""
    backends = list(dict.fromkeys(agg["backend"]))
    fig, axes = _figure(1, len(backends), (5.5 * len(backends), 4))
    for ax, be in zip(axes[0], backends):
        a = agg[agg["backend"] == be]
        mixes = list(dict.fromkeys(a["mix"]))
        x = np.arange(len(mixes))
        for k, reg in enumerate(r for r in REGIONS if r in set(a["region"])):
            r = a[a["region"] == reg].set_index("mix").reindex(mixes)
            lo = np.nan_to_num(r["dice_mean"] - r["dice_ci_low"])
            hi = np.nan_to_num(r["dice_ci_high"] - r["dice_mean"])
            # markers only: mixes are categories, a line between them would suggest interpolation
            ax.errorbar(x + (k - 1) * 0.08, r["dice_mean"], yerr=[lo, hi], marker="o", linestyle="none", capsize=3,
                        label=reg)
        ax.set_xticks(x, mixes, rotation=20)
        ax.set_xlabel("training mix (real:synthetic)")
        ax.set_ylabel("Dice (mean, 95% bootstrap CI)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{title} — {be}")
        ax.grid(alpha=0.3)
        ax.legend()
    return _savefig(fig, path)


def plot_boxplots(per_case: pd.DataFrame, path: Path, title: str) -> Path:
    """Per-region box plots of per-case Dice (mean over seeds) for each mix and backend."""
    regions = [r for r in REGIONS if r in set(per_case["region"])]
    runs = mix_order(per_case[["mix", "n_real", "n_synth", "backend"]].drop_duplicates())
    multi = runs["backend"].nunique() > 1
    fig, axes = _figure(1, len(regions), (4.5 * len(regions), 4))
    for ax, reg in zip(axes[0], regions):
        data, labels = [], []
        for _, run in runs.iterrows():
            g = per_case[(per_case["mix"] == run["mix"]) & (per_case["backend"] == run["backend"])
                         & (per_case["region"] == reg)]
            data.append(g.groupby("case_id")["dice"].mean().dropna().to_numpy())
            labels.append(f"{run['mix']}\n{run['backend']}" if multi else str(run["mix"]))
        ax.boxplot(data, tick_labels=labels)
        ax.set_title(f"{reg} — {title}")
        ax.set_ylabel("Dice per test case")
        ax.set_ylim(-0.02, 1.02)
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(alpha=0.3)
    return _savefig(fig, path)


def plot_montage(real_manifest: Path, synthetic_manifest: Path, path: Path, n_samples: int = 2) -> Path | None:
    """Real image vs synthetic samples conditioned on the same mask: 4 modalities + mask, axial slice through
    the tumour centre. None if no synthetic case's parent is a real case of the cohort."""
    from cohort.manifest import load_case, load_manifest

    real = load_manifest(real_manifest).set_index("case_id", drop=False)
    syn = load_manifest(synthetic_manifest)
    syn = syn[syn["source"] == "synthetic"]
    parents = [p for p in syn["parent_case_id"].dropna().astype(str) if p in real.index]
    if not parents:
        return None
    owner = parents[0]
    samples = syn[syn["parent_case_id"].astype(str) == owner].head(n_samples)
    rvol, rlab = load_case(real_manifest, real.loc[owner])
    tumour = np.argwhere(np.isin(rlab, (1, 2, 3)))
    z = int(np.round(tumour[:, 2].mean())) if len(tumour) else rlab.shape[2] // 2
    rows = [(f"real {owner}", rvol, rlab)]
    for _, r in samples.iterrows():
        v, lab = load_case(synthetic_manifest, r)
        rows.append((f"synthetic {r['case_id']}", v, lab))
    mods = [m for m in MODALITIES if m in rvol.channels]
    fig, axes = _figure(len(rows), len(mods) + 1, (2.2 * (len(mods) + 1), 2.3 * len(rows)))
    for i, (name, vol, lab) in enumerate(rows):
        for j, m in enumerate(mods):
            ax = axes[i, j]
            if m in vol.channels:
                # each image windowed to its own 1-99 % inside the brain: a cohort's real images need not share the
                # generator's [-1, 1] scale (the phantom's are raw, white matter = 1), so one shared window can
                # show a good sample as black speckle; contrast between tissues is what rows should compare
                lo, hi = np.percentile(vol.channel(m)[lab > 0], [1, 99])
                ax.imshow(np.rot90(vol.channel(m)[:, :, z]), cmap="gray", vmin=lo, vmax=hi)
            ax.set_title(f"{m}" if i == 0 else "", fontsize=9)
            ax.set_ylabel(name, fontsize=8) if j == 0 else None
            ax.set_xticks([]), ax.set_yticks([])
        ax = axes[i, len(mods)]
        ax.imshow(np.rot90(lab[:, :, z]), cmap="viridis", vmin=0, vmax=4, interpolation="nearest")
        ax.set_title("mask (labels 0-4)" if i == 0 else "", fontsize=9)
        ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{synthetic_manifest.parent.name}: same mask (owner {owner}), axial slice z={z}; "
                 "each image windowed to its own 1-99 % inside the brain", fontsize=10)
    return _savefig(fig, path)


def plot_memorisation(mem: pd.DataFrame, path: Path) -> Path:
    """Per synthetic cohort: histograms (outlines) of nearest-training-neighbour similarity of real test images
    (the calibration), of synthetic images, and of synthetic images to their mask's owner; dashed: threshold."""
    ids = list(dict.fromkeys(mem["synthetic_id"]))
    fig, axes = _figure(1, len(ids), (6 * len(ids), 3.5))
    sims = pd.concat([mem["nn_similarity"], mem["owner_similarity"]]).astype(float).dropna()
    bins = np.linspace(min(float(sims.min()), 0.0), 1, 41)
    for ax, sid in zip(axes[0], ids):
        g = mem[mem["synthetic_id"] == sid]
        cal, syn = g[g["kind"] == "calibration"], g[g["kind"] == "synthetic"]
        ax.hist(cal["nn_similarity"].astype(float), bins=bins, histtype="step", lw=2,
                label="real test → nearest train")
        ax.hist(syn["nn_similarity"].astype(float), bins=bins, histtype="step", lw=2, ls="--",
                label="synthetic → nearest train")
        own = syn["owner_similarity"].astype(float).dropna()
        if len(own):
            ax.hist(own, bins=bins, histtype="step", lw=1.5, ls=":", label="synthetic → mask owner")
        ax.axvline(float(g["threshold"].iloc[0]), color="k", ls="--", lw=1, label="copy threshold")
        ax.set_xlabel(f"similarity ({g['similarity'].iloc[0]})")
        ax.set_ylabel("images")
        ax.set_title(str(sid))
        ax.legend(fontsize=8, loc="upper left")
    return _savefig(fig, path)


# ------------------------------------------------------------------------------------------ the report

class _Doc:
    """Builds report.md and report.html side by side."""

    def __init__(self, title: str):
        self.md = [f"# {title}", ""]
        self.html = [f"<h1>{html.escape(title)}</h1>"]

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

    def render_html(self) -> str:
        style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                 "table.t{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}"
                 "table.t td,table.t th{border:1px solid #bbb;padding:3px 6px;text-align:left}"
                 "pre{background:#f4f4f4;padding:0.6em;overflow-x:auto;font-size:0.8em}img{max-width:100%}")
        return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/><title>Study report</title>'
                f"<style>{style}</style></head><body>\n" + "\n".join(self.html) + "\n</body></html>\n")


def _segmentation_section(doc: _Doc, per_case: pd.DataFrame, test_set: str, out: Path, primary: bool,
                          results: list[pd.DataFrame], seed: int) -> None:
    pc = per_case[per_case["test_set"].astype(str) == test_set]
    agg = aggregate(pc, seed=seed)
    paired = paired_vs_real(pc, seed=seed)
    results.append(agg.merge(paired.drop(columns=["kind"], errors="ignore"), how="left",
                             on=["mix", "n_real", "n_synth", "backend", "test_set", "region"]))
    slug = "" if primary else "_" + "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in test_set)
    doc.h(f"Dice by training mix — test set '{test_set}'" + ("" if primary else " (external)"))
    doc.p("Rows: training mixes (real only, synthetic only, real + synthetic at each ratio). Cells: mean ± sd over "
          "test cases and seeds [bootstrap 95% CI over test cases, seeds averaged per case]. Δ: paired difference "
          "with the real-only mix, per test case [bootstrap 95% CI]. Empty regions: both empty → Dice 1, HD95 0; "
          "one empty → Dice 0, HD95 = image diagonal.")
    for be in dict.fromkeys(agg["backend"]):
        doc.h(f"Segmenter backend: {be}", 3)
        doc.table(dice_table(agg[agg["backend"] == be], paired[paired["backend"] == be] if len(paired) else paired))
        doc.p("HD95 (mm):")
        doc.table(dice_table(agg[agg["backend"] == be], paired.iloc[0:0], metric="hd95"))
    doc.image(plot_dice_by_ratio(agg, out / f"dice_by_ratio{slug}.png", test_set), f"Dice by mix ({test_set})")
    doc.image(plot_boxplots(pc, out / f"dice_boxplots{slug}.png", test_set), f"Dice per case ({test_set})")


def build_report(study_dir: str | Path, *, seed: int = 0) -> Path:
    """Build STUDY/report/ from the files listed in this module's docstring; returns the report folder.

    Deterministic: same inputs and seed -> same tables (bootstrap seeded). Raises CohortError naming the file
    if results/per_case.csv is missing or lacks columns.
    """
    study = Path(study_dir)
    out = study / "report"
    per_case = _read_table(study / "results" / "per_case.csv", PER_CASE_COLUMNS, required=True)
    synth = _read_table(study / "results" / "synthesis.csv", SYNTHESIS_COLUMNS, required=False)
    mem = _read_table(study / "results" / "memorisation.csv", MEMORISATION_COLUMNS, required=False)
    record = StudyRecord.read(study)
    meta = record.as_written() if record is not None else {}
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.png"):  # plots of a previous build that this one may not redraw (e.g. a removed test set)
        stale.unlink()
    per_case["test_set"] = per_case["test_set"].astype(str)
    per_case["mix"] = per_case["mix"].astype(str)

    doc = _Doc(f"Augmentation study report — {study.name}")
    try:
        real_manifest = _real_manifest(study)
        from cohort.manifest import load_manifest

        cohorts = sorted(set(load_manifest(real_manifest)["cohort"].dropna().astype(str)))
    except CohortError:
        real_manifest, cohorts = None, []
    doc.p(f"Study folder: {study.resolve()}. Real cohort: {', '.join(cohorts) or 'unknown'}.")
    if PHANTOM_COHORT in cohorts:
        doc.p(PHANTOM_NOTE, strong=True)

    results: list[pd.DataFrame] = []
    primary = _primary_test_set(per_case, record)
    _segmentation_section(doc, per_case, primary, out, True, results, seed)
    for ts in dict.fromkeys(per_case["test_set"]):
        if ts != primary:
            _segmentation_section(doc, per_case, ts, out, False, results, seed)

    doc.h("Synthetic images: samples (same mask, real vs synthetic)")
    n_montage = 0
    if real_manifest is not None:
        for sid, man in _synthetic_manifests(study).items():
            png = plot_montage(real_manifest, man, out / f"montage_{sid}.png")
            if png is not None:
                doc.image(png, f"montage {sid}")
                n_montage += 1
    if not n_montage:
        doc.p("No synthetic cohort with a mask owned by a real case of this study was found (STUDY/synthetic/).")

    doc.h("Synthesis fidelity and diversity")
    if synth is not None and len(synth):
        doc.p(FID_NOTE, strong=True)
        doc.p("semantic_*: a real-only segmenter applied to synthetic images, scored against their conditioning "
              "masks. ms_ssim_*: mean pairwise MS-SSIM (lower = more diverse), beside the same on real images. "
              "mmd: MONAI MMD between real and synthetic images.")
        for sid, g in synth.groupby("synthetic_id", sort=False):
            doc.h(f"Synthetic cohort {sid}", 3)
            doc.table(_round(g.drop(columns=["synthetic_id"]).fillna({"region": ""})))
    else:
        doc.p("Not computed for this study (results/synthesis.csv absent).")

    doc.h("Memorisation and privacy")
    doc.p(ANATOMY_NOTE, strong=True)
    if mem is not None and len(mem):
        doc.p("For each synthetic image: its most similar training image (Pearson correlation inside the brain, "
              "mean over modalities) and its similarity to the real image that owns its conditioning mask. Copy "
              "threshold: calibrated on real test images vs the training images (rule in the table); frac_copy_* = "
              "fraction above it. Because the mask carries anatomy, a synthetic image can pass that threshold "
              "against its owner without memorising anything; mask_similarity is the similarity the mask alone "
              "explains (the mask filled with the owner's mean intensity per label), and frac_beyond_mask is the "
              "fraction of synthetic images more similar to their owner than that: the memorisation signal.")
        doc.table(_round(summarise(mem)))
        doc.image(plot_memorisation(mem, out / "memorisation.png"), "nearest-neighbour similarity")
    else:
        doc.p("Not computed for this study (results/memorisation.csv absent).")

    doc.h("Reproducibility: configuration, hashes, versions, wall times")
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

    res = pd.concat(results, ignore_index=True)
    with atomic_path(out / "results.csv") as tmp:
        res.to_csv(tmp, index=False)
    atomic_write_text(out / "report.md", "\n".join(doc.md) + "\n")
    atomic_write_text(out / "report.html", doc.render_html())
    return out

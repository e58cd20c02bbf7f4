"""The report's figures: Dice by mix, per-case box plots, real-vs-synthetic montages, memorisation histograms.

Each function draws one PNG (matplotlib Figure without pyplot, so no global state: safe in flow threads) and
writes it atomically. Images are read only through cohort.manifest.read_case (cohort/ owns NIfTI).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.fsutil import atomic_path
from cohort.labels import MODALITIES, REGIONS, tumour_slice

from .stats import mix_order

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
    """Mean Dice per mix (paper order) with 95 % interval error bars (eval.stats.case_seed_interval); one panel
    per backend, one line per region."""
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
        ax.set_ylabel("Dice (mean, 95% interval)")
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


def _show_windowed(ax, image: np.ndarray, label: np.ndarray, z: int) -> None:
    """Axial slice z of one image, windowed to its own 1-99 % inside the brain (label > 0): a cohort's real images
    need not share the generator's [-1, 1] scale (the phantom's are raw, white matter = 1), so one shared window
    can show a good sample as black speckle; contrast between tissues is what rows should compare."""
    lo, hi = np.percentile(image[label > 0], [1, 99])
    ax.imshow(np.rot90(image[:, :, z]), cmap="gray", vmin=lo, vmax=hi)


def plot_montage(real_manifest: Path, synthetic_manifest: Path, path: Path, n_samples: int = 2) -> Path | None:
    """Real image vs synthetic samples conditioned on the same mask: 4 modalities + mask, axial slice through
    the tumour centre. None if no synthetic case's parent is a real case of the cohort."""
    from cohort.manifest import read_case, load_manifest

    real = load_manifest(real_manifest).set_index("case_id", drop=False)
    syn = load_manifest(synthetic_manifest)
    syn = syn[syn["source"] == "synthetic"]
    parents = [p for p in syn["parent_case_id"].dropna().astype(str) if p in real.index]
    if not parents:
        return None
    owner = parents[0]
    samples = syn[syn["parent_case_id"].astype(str) == owner].head(n_samples)
    real_case = read_case(real_manifest, real.loc[owner])
    rvol, rlab = real_case.image, real_case.label_map
    z = tumour_slice(rlab)
    rows = [(f"real {owner}", rvol, rlab)]
    for _, r in samples.iterrows():
        sample = read_case(synthetic_manifest, r)
        rows.append((f"synthetic {r['case_id']}", sample.image, sample.label_map))
    mods = [m for m in MODALITIES if m in rvol.channels]
    fig, axes = _figure(len(rows), len(mods) + 1, (2.2 * (len(mods) + 1), 2.3 * len(rows)))
    for i, (name, vol, lab) in enumerate(rows):
        for j, m in enumerate(mods):
            ax = axes[i, j]
            if m in vol.channels:
                _show_windowed(ax, vol.channel(m), lab, z)
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


def plot_sampler_montage(real_manifest: Path, pools: dict[str, Path], owners: list[str], path: Path,
                         modality: str = "t1ce") -> Path:
    """Samplers side by side on the same masks (bench.bench_sampler_table): rows = the real image, then each pool
    (name -> synthetic manifest) in order; columns = the masks of ``owners`` (real case ids), each cut on the axial
    slice through its tumour (tumour_slice) and windowed as plot_montage does. One modality (``modality`` if the
    images have it, else their first): the grid compares samplers, not channels. A cell stays empty where a pool
    has no sample on that mask."""
    from cohort.manifest import read_case, load_manifest

    real = load_manifest(real_manifest).set_index("case_id", drop=False)
    cells: dict[tuple[str, str], tuple] = {}
    for owner in owners:
        case = read_case(real_manifest, real.loc[owner])
        cells[("real", owner)] = (case.image, case.label_map)
    for name, pool in pools.items():
        syn = load_manifest(pool)
        for owner in owners:
            hit = syn[syn["parent_case_id"].astype(str) == owner].head(1)
            if len(hit):
                sample = read_case(pool, hit.iloc[0])
                cells[(name, owner)] = (sample.image, sample.label_map)
    channels = cells[("real", owners[0])][0].channels
    shown = modality if modality in channels else channels[0]
    names = ["real", *pools]
    fig, axes = _figure(len(names), len(owners), (2.6 * len(owners), 2.4 * len(names)))
    for i, name in enumerate(names):
        for j, owner in enumerate(owners):
            ax = axes[i, j]
            if (name, owner) in cells:
                vol, lab = cells[(name, owner)]
                z = tumour_slice(cells[("real", owner)][1])  # the mask's own slice, the same in every row
                _show_windowed(ax, vol.channel(shown), lab, z)
            ax.set_title(f"mask of {owner}" if i == 0 else "", fontsize=9)
            ax.set_ylabel(name, fontsize=9) if j == 0 else None
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"{shown}, same masks in every row; axial slice through each mask's tumour; each image windowed to "
                 "its own 1-99 % inside the brain", fontsize=9)
    return _savefig(fig, path)


def plot_memorisation(mem: pd.DataFrame, path: Path, baseline_id: str | None = None) -> Path:
    """Per synthetic cohort: histograms (outlines) of nearest-training-neighbour similarity of real test images
    (the calibration), of synthetic images, and of synthetic images to their mask's owner; dashed: threshold.
    baseline_id: the cohort of samples on held-out masks, whose owner similarity (the memorisation baseline) is
    drawn filled in every other cohort's panel."""
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
        base = mem[(mem["synthetic_id"] == baseline_id) & (mem["kind"] == "synthetic")]["owner_similarity"]
        base = base.astype(float).dropna()
        if sid != baseline_id and len(base):
            ax.hist(base, bins=bins, alpha=0.3, color="grey", label="held-out masks → owner (baseline)")
        ax.axvline(float(g["threshold"].iloc[0]), color="k", ls="--", lw=1, label="copy threshold")
        ax.set_xlabel(f"similarity ({g['similarity'].iloc[0]})")
        ax.set_ylabel("images")
        ax.set_title(str(sid))
        ax.legend(fontsize=8, loc="upper left")
    return _savefig(fig, path)

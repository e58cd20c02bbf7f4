"""Quality-gate calibration on the phantom cohort (real atlas anatomy with simulated tumours): over many random draws
of the generator's training cases (the study uses 8), the gate learnt from the draw must pass the held-out real cases
(target >= 95 %, also in draws where a label occurs in only 1-2 training cases) and fail corrupted copies of them
(target: each corruption passes <= 5 %): each of the six modality swaps, each modality copied into another, Gaussian
blur (sigma in voxels), the mask painted with each label's median + N(0, 0.05), added noise and a grey background.

    .venv/bin/python -m bench.bench_quality_gate --work /tmp/gate --cases 120 --seed 1 --n-train 8 --draws 200

The `pools` subcommand instead gives the pass rate of a study's synthetic samples under a gate learnt from its
generator's training cases (config.json's train_cases, read from --cohort), beside the pass rate their
quality_report.csv recorded, and with --fresh N that of N new draws of the generator:

    .venv/bin/python -m bench.bench_quality_gate pools --generator RUN/medddpm --cohort RUN/cohort/data_manifest.csv \\
        --pools RUN/synthetic [--fresh 16]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

MODALITIES = ("t1", "t1ce", "t2", "flair")
PAINT_SD = 0.05


def corruptions(modalities=MODALITIES, blur_sigmas=(1.0, 1.5)) -> list[str]:
    """The corruption names: swap:a-b (each pair), copy:a>b (a written over b), blur:<sigma>, paint, noise, grey."""
    return ([f"swap:{a}-{b}" for a, b in itertools.combinations(modalities, 2)]
            + [f"copy:{a}>{b}" for a, b in itertools.permutations(modalities, 2)]
            + [f"blur:{s:g}" for s in blur_sigmas] + ["paint", "noise", "grey"])


def corrupt(image: np.ndarray, label: np.ndarray, kind: str, rng: np.random.Generator,
            modalities=MODALITIES) -> np.ndarray:
    """A corrupted copy of image (C, X, Y, Z; model space) with label (X, Y, Z)."""
    from scipy.ndimage import gaussian_filter

    x = np.array(image, dtype=np.float32, copy=True)
    name, _, arg = kind.partition(":")
    if name == "swap":
        a, b = (modalities.index(m) for m in arg.split("-"))
        x[[a, b]] = x[[b, a]]
    elif name == "copy":
        a, b = (modalities.index(m) for m in arg.split(">"))
        x[b] = x[a]
    elif name == "blur":  # in voxels, each channel on its own
        x = np.stack([gaussian_filter(c, float(arg)) for c in x])
    elif name == "paint":  # the mask painted with each label's median (this case's) plus noise: no anatomy
        for v in np.unique(label):
            sel = label == v
            for c in range(len(x)):
                x[c][sel] = np.median(image[c][sel]) + rng.normal(0, PAINT_SD, int(sel.sum()))
        x = np.clip(x, -1, 1)
    elif name == "noise":
        x = np.clip(x + rng.normal(0, 0.2, x.shape), -1, 1)
    elif name == "grey":
        x = np.where(label[None] == 0, -0.3, x)
    else:
        raise ValueError(f"unknown corruption {kind!r}")
    return x.astype(np.float32)


def real_cases(manifest, profile: str = "demo"):
    """(images, labels, case ids) of every real case of a manifest, in the generator's model space."""
    from synth.config import get_config
    from synth.data import load_items, training_rows

    cfg = get_config(profile if profile in ("tiny", "demo") else "demo")
    items = load_items(manifest, cfg, training_rows(manifest, cfg, splits=("train", "val", "test")))
    return ([np.asarray(it["image"]) for it in items], [np.asarray(it["label"])[0] for it in items],
            [it["case_id"] for it in items])


def calibration(images, labels, n_train: int, draws: int, seed: int, kinds: list[str]) -> dict:
    """Pass rates over random training draws: {"real": [per draw], "real_by_ncr": {count: [...]},
    "corrupt": {kind: [per draw]}}; each case's statistics are computed once (the corrupted copy too)."""
    from cohort.labels import NCR
    from synth.quality import MIN_VOXELS, case_statistics, envelopes, judge, ranges_from_statistics

    rng = np.random.default_rng(seed)
    real = [case_statistics(x, lab, MODALITIES) for x, lab in zip(images, labels)]
    bad = {k: [case_statistics(corrupt(x, lab, k, rng), lab, MODALITIES) for x, lab in zip(images, labels)]
           for k in kinds}
    has_ncr = np.array([(lab == NCR).sum() >= MIN_VOXELS for lab in labels])
    out: dict = {"real": [], "real_by_ncr": {}, "corrupt": {k: [] for k in kinds}}
    for _ in range(draws):
        train = rng.choice(len(real), n_train, replace=False)
        envs = envelopes(ranges_from_statistics([real[i] for i in train], MODALITIES))
        held = np.setdiff1d(np.arange(len(real)), train)
        rate = float(np.mean([not judge(real[i], envs) for i in held]))
        out["real"].append(rate)
        out["real_by_ncr"].setdefault(min(int(has_ncr[train].sum()), 3), []).append(rate)
        for k in kinds:
            out["corrupt"][k].append(float(np.mean([not judge(bad[k][i], envs) for i in held])))
    return out


def _calibrate(a) -> int:
    from cohort.phantom import build_phantom_cohort

    manifest = build_phantom_cohort(Path(a.work) / "cohort", n_cases=a.cases, seed=a.seed, profile=a.profile,
                                    progress=False)
    images, labels, _ = real_cases(manifest, a.profile)
    kinds = corruptions()
    res = calibration(images, labels, a.n_train, a.draws, a.seed, kinds)
    print(f"phantom cohort (real atlas anatomy, simulated tumours), {len(images)} real cases ({a.profile}); "
          f"{a.draws} random draws of {a.n_train} training cases, the rest held out")
    print("| cases judged | pass rate (mean over draws) | lowest draw | target |")
    print("|---|---|---|---|")
    r = np.array(res["real"])
    print(f"| held-out real, all draws | {r.mean():.1%} | {r.min():.1%} | >= 95 % |")
    for n, rates in sorted(res["real_by_ncr"].items()):
        what = f"NCR in {n} training case{'s' if n != 1 else ''}" if n < 3 else "NCR in >= 3 training cases"
        print(f"| held-out real, draws with {what} ({len(rates)} draws) | {np.mean(rates):.1%} | "
              f"{np.min(rates):.1%} | >= 95 % |")
    for k in kinds:
        c = np.array(res["corrupt"][k])
        print(f"| {k} | {c.mean():.1%} | max {c.max():.1%} | <= 5 % |")
    return 0


def _pools(a) -> int:
    import json

    import pandas as pd

    from cohort.manifest import load_manifest, read_case
    from cohort.volume import select_channels
    from synth.quality import case_statistics, envelopes, judge, ranges_from_statistics

    train_ids = json.loads((Path(a.generator) / "config.json").read_text())["train_cases"]
    images, labels, ids = real_cases(a.cohort)
    train = [ids.index(c) for c in train_ids]
    envs = envelopes(ranges_from_statistics([case_statistics(images[i], labels[i], MODALITIES) for i in train],
                                            MODALITIES))
    rows = []
    for man in sorted(Path(a.pools).glob("*/data_manifest.csv")):
        report = pd.read_csv(man.parent / "quality_report.csv")
        for _, row in load_manifest(man).iterrows():
            case = read_case(man, row)
            img = select_channels(case.image, MODALITIES, man, "the gate", case_id=case.case_id).data
            fails = judge(case_statistics(np.asarray(img), np.asarray(case.label.data).reshape(img.shape[1:]),
                                          MODALITIES), envs)
            rep = report[report["case_id"] == row["case_id"]]
            rows.append({"pool": man.parent.name, "case": row["case_id"], "new": not fails,
                         "recorded_attempts": len(rep), "recorded_first": bool(rep.sort_values("attempt")["passed"]
                                                                            .iloc[0]) if len(rep) else None,
                         "failures": "; ".join(fails)})
    df = pd.DataFrame(rows)
    print(f"{len(df)} synthetic samples (the kept draw of each case) of {Path(a.generator)}; gate learnt from its "
          f"{len(train)} training cases")
    for pool, g in df.groupby("pool"):
        first = g["recorded_first"]
        print(f"{pool}: recorded gate, first draw passed {first.mean():.1%} ({int(first.sum())}/{len(g)}; draws "
              f"recorded {int(g['recorded_attempts'].sum())}); this gate passes the kept draw "
              f"{g['new'].mean():.1%} ({int(g['new'].sum())}/{len(g)})")
    for f in df.loc[~df["new"], "failures"]:
        print("  failed:", f)
    if a.fresh:
        _fresh_draws(a, images, labels, ids, train, envs)
    return 0


def _fresh_draws(a, images, labels, ids, train, envs) -> None:
    """--fresh N: N new draws of the generator (the default sampler; seeds 7000 + i), on its training masks, then
    held-out ones, judged without redraws."""
    import torch

    from synth import defaults
    from synth.checkpoint import load_generator
    from synth.network import condition_from_label
    from synth.quality import case_statistics, judge
    from synth.schedulers import make_sampler, sample

    model, cfg, _ = load_generator(Path(a.generator) / "generator.safetensors")
    sampler = make_sampler(defaults.SAMPLER, cfg.timesteps, cfg.schedule, eta=defaults.ETA)
    masks = (train + [i for i in range(len(ids)) if i not in train])[:a.fresh]
    passed = []
    for j, i in enumerate(masks):
        cond = torch.as_tensor(condition_from_label(labels[i], cfg.condition))[None]
        x = sample(model, sampler, cond, cfg.out_channels, defaults.STEPS, [7000 + j],
                   prediction=cfg.prediction).numpy()[0]
        fails = judge(case_statistics(x, labels[i], MODALITIES), envs)
        passed.append(not fails)
        print(f"fresh draw on {ids[i]} ({'training' if i in train else 'held-out'} mask): "
              f"{'pass' if not fails else '; '.join(fails)}", flush=True)
    print(f"fresh draws ({defaults.SAMPLER}, {defaults.STEPS} steps, eta {defaults.ETA:g}): this gate passes "
          f"{np.mean(passed):.1%} ({sum(passed)}/{len(passed)})")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pools"]:
        ap = argparse.ArgumentParser(prog="bench_quality_gate pools")
        ap.add_argument("--generator", required=True, help="the generator's folder (config.json with train_cases)")
        ap.add_argument("--cohort", required=True, help="data_manifest.csv holding those training cases")
        ap.add_argument("--pools", required=True, help="folder of synthetic pools (*/data_manifest.csv)")
        ap.add_argument("--fresh", type=int, default=0, help="also judge N new draws of the generator (no redraws)")
        return _pools(ap.parse_args(argv[1:]))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", required=True)
    ap.add_argument("--cases", type=int, default=120)
    ap.add_argument("--profile", default="demo")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--n-train", type=int, default=8, help="training cases per draw (the study's generator: 8)")
    ap.add_argument("--draws", type=int, default=200, help="random training draws")
    return _calibrate(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""The sampler table's paired comparison with the reference sampler (eval.stats.paired_vs_first, used by
bench.bench_sampler_table; the target 'within 0.02 of DDPM-250'): planted Dice differences must come out as
non-inferior / equivalent or not."""
from __future__ import annotations

import numpy as np
import pandas as pd

from eval.stats import paired_vs_first


def _scores(offsets: dict[str, float], seeds, n_cases=12, noise=0.01, seed=0):
    rng = np.random.default_rng(seed)
    case_level = rng.uniform(0.5, 0.9, size=n_cases)  # shared by every run: the pairing removes it
    return {(run, s): pd.DataFrame([{"case_id": f"c{i}", "region": r,
                                     "dice": case_level[i] + off + noise * rng.standard_normal()}
                                    for i in range(n_cases) for r in ("WT", "TC", "ET")])
            for run, off in offsets.items() for s in seeds}


def test_paired_difference_recovers_planted_offsets_and_judges_the_margin():
    seeds = [0, 1, 2]
    rows = [{"run": "ddpm:250"}, {"run": "same"}, {"run": "worse"}, {"run": "better"}]
    scores = _scores({"ddpm:250": 0.0, "same": 0.0, "worse": -0.1, "better": 0.1}, seeds)
    out = paired_vs_first([row["run"] for row in rows], scores, seeds, 0.02).set_index(["run", "region"])
    assert set(out.index.get_level_values("run")) == {"same", "worse", "better"}  # the reference is not compared
    for region in ("WT", "TC", "ET"):
        assert abs(out.loc[("same", region), "delta"]) < 0.01
        assert abs(out.loc[("worse", region), "delta"] + 0.1) < 0.01
        assert out.loc[("same", region), "equivalent (+-0.02)"]
        assert not out.loc[("worse", region), "non-inferior (margin 0.02)"]
        assert out.loc[("better", region), "non-inferior (margin 0.02)"]
        assert not out.loc[("better", region), "equivalent (+-0.02)"]
        worse = out.loc[("worse", region)]
        assert worse["ci_low"] < worse["delta"] < worse["ci_high"] < -0.02

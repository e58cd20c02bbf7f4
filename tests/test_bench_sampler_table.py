"""The sampler table's paired comparison with the reference sampler (eval.stats.paired_vs_first, used by
bench.bench_sampler_table; the target 'within 0.02 of DDPM-250'): planted Dice differences must come out as
non-inferior / equivalent or not; and the bench end to end with a tiny generator and its distilled student
(issue 33): the student's row, timings of fresh volumes (min <= median), fidelity intervals, the montage, and the
errors of a 'distilled' run without a student."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eval.stats import paired_vs_first
from tests.distill_helpers import tiny_teacher_and_student


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


# --------------------------------------------------------------- the bench end to end with a distilled student

@pytest.fixture(scope="module")
def tiny_generators(toy_cohort, tmp_path_factory):
    """(teacher, student): an untrained tiny generator and its 1-step student after one 2 -> 1 round of 2 steps
    (as tests/test_distill_flows.py makes them: speed and plumbing, not quality); the teacher gets the student's
    gate ranges (distill writes them from the cohort; a generator saved untrained has none)."""
    from synth.checkpoint import RANGES_FILE

    teacher, student = tiny_teacher_and_student(tmp_path_factory.mktemp("generators"), toy_cohort)
    shutil.copy(student.parent / RANGES_FILE, teacher.parent / RANGES_FILE)
    return teacher, student


@pytest.mark.usefixtures("one_torch_thread")
def test_bench_times_the_student_beside_the_samplers_with_fidelity_intervals_and_a_montage(
        toy_cohort, tiny_generators, tmp_path, capsys, monkeypatch):
    from bench.bench_sampler_table import main

    teacher, student = tiny_generators
    work, montage = tmp_path / "work", tmp_path / "montage.png"
    base = ["--generator", str(teacher), "--student", str(student), "--cohort", str(toy_cohort), "--work", str(work),
            "--runs", "ddim:4:0", "distilled", "--n-real", "3", "--n-boot", "100", "--montage", str(montage)]
    import synth.synthesize

    calls, synthesize = [], synth.synthesize.synthesize_cohort

    def recording(gen, masks, out, config):  # (folder under work, cases there before, cases after) of each call
        before = len(pd.read_csv(Path(out) / "data_manifest.csv")) if (Path(out) / "data_manifest.csv").exists() else 0
        manifest = synthesize(gen, masks, out, config)
        calls.append(("/".join(Path(out).relative_to(work).parts[:2]), before, len(pd.read_csv(manifest))))
        return manifest

    monkeypatch.setattr(synth.synthesize, "synthesize_cohort", recording)
    assert main([*base, "--repeats", "2", "--seeds"]) == 0
    # the pools, then the timings into empty folders, repeat 1 of every run before repeat 2 of any
    assert calls == [("ddim_4_0/synthetic", 0, 3), ("distilled-1/synthetic", 0, 3)] + \
        [("timing/ddim_4_0", 0, 3), ("timing/distilled-1", 0, 3)] * 2
    table = pd.read_csv(work / "sampler_table.csv").set_index("run")
    assert list(table.index) == ["ddim:4:0", "distilled-1"]  # the student's row is named by its card's steps
    assert (table["s/volume min"] > 0).all() and (table["s/volume min"] <= table["s/volume median"]).all()
    assert table.loc["ddim:4:0", "x first (min)"] == 1.0 and "s/volume" not in table.columns
    # per volume that passes the gate: the median ratio scaled by the runs' pass rates (NaN where none passed)
    ref, row = table.loc["ddim:4:0"], table.loc["distilled-1"]
    if ref["gate pass"] > 0 and row["gate pass"] > 0:
        assert row["x first per passing volume (median)"] == pytest.approx(
            ref["s/volume median"] / ref["gate pass"] / (row["s/volume median"] / row["gate pass"]), rel=0.05, abs=0.1)
    else:
        assert np.isnan(row["x first per passing volume (median)"])
    timings = pd.read_csv(work / "sampler_timings.csv")
    assert timings["run"].tolist() == ["ddim:4:0", "ddim:4:0", "distilled-1", "distilled-1"]
    assert not (work / "timing" / "distilled-1").exists()  # the throwaway folders are gone
    # the student's pool was made by the student with sampler distilled-1 (synth records it)
    pool = pd.read_csv(work / "distilled-1" / "synthetic" / "data_manifest.csv")
    assert set(pool["sampler"]) == {"distilled-1"} and len(pool) == 3
    fidelity = pd.read_csv(work / "sampler_fidelity.csv").set_index("run")
    assert list(fidelity.index) == ["ddim:4:0", "distilled-1"]
    for metric in ("fidelity_frd", "fidelity_frd_excess", "paired_ms_ssim"):
        assert (fidelity[f"{metric}_lo"] <= fidelity[metric]).all() and \
            (fidelity[metric] <= fidelity[f"{metric}_hi"]).all(), metric
        assert (fidelity[f"{metric}_lo"] < fidelity[f"{metric}_hi"]).all(), metric  # an interval, not a point
    assert (fidelity["n"] == 3).all() and (fidelity["gate pass"] == fidelity["gate_passed"].astype(str) + "/3").all()
    assert montage.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"student {student}: 1-step, distilled from --generator; gate ranges the same" in out
    assert "fidelity_frd_excess" in out
    # resumed (and a killed bench's timing folder left behind): the pools are read, each timing writes and gates
    # all its volumes anew into an empty folder, so its seconds are never a resumed pool's ~0
    (work / "timing" / "ddim_4_0").mkdir(parents=True)
    shutil.copy(work / "ddim_4_0" / "synthetic" / "data_manifest.csv", work / "timing" / "ddim_4_0")
    calls.clear()
    assert main([*base, "--seeds", "0", "--jobs", "1", "--segmenter", '{"epochs": 1, "iters_per_epoch": 1}']) == 0
    assert calls == [("ddim_4_0/synthetic", 3, 3), ("distilled-1/synthetic", 3, 3), ("timing/ddim_4_0", 0, 3),
                     ("timing/distilled-1", 0, 3)]
    # the segmenters trained on each pool: the student's paired Dice difference from the first run, per region
    deltas = pd.read_csv(work / "sampler_deltas.csv")
    assert deltas["run"].tolist() == ["distilled-1"] * 3 and set(deltas["vs"]) == {"ddim:4:0"}


def test_distilled_run_needs_a_student_and_a_student_file(toy_cohort, tiny_generators, tmp_path):
    from bench.bench_sampler_table import main

    teacher, student = tiny_generators
    base = ["--generator", str(teacher), "--cohort", str(toy_cohort), "--work", str(tmp_path / "w"), "--seeds"]
    with pytest.raises(SystemExit, match=re.escape("each run once, not ['distilled-1', 'distilled-1']")):
        main([*base, "--runs", "distilled", "--student", str(student), str(student)])  # two rows of one name
    with pytest.raises(SystemExit, match="run 'distilled' needs --student PATH"):
        main([*base, "--runs", "ddpm:4", "distilled"])
    # synth's messages, naming the file
    with pytest.raises(SystemExit, match=f"{re.escape(str(teacher))}: not a distilled student"):
        main([*base, "--runs", "distilled", "--student", str(teacher)])
    with pytest.raises(SystemExit, match="takes no fields"):
        main([*base, "--runs", "distilled:4", "--student", str(teacher)])
    with pytest.raises(SystemExit, match=f"{re.escape(str(tmp_path / 'none.safetensors'))}: .*does not exist"):
        main([*base, "--runs", "distilled", "--student", str(tmp_path / "none.safetensors")])
    assert not (tmp_path / "w").exists()  # refused before any work


def _noisy_scores(offsets: dict[str, float], seeds, *, case_sd: float, seed_sd: float, resid_sd: float,
                  n_cases: int = 12, rng_seed: int = 0):
    """Dice tables whose run differences have known components: per run a case effect, a seed effect and a
    case × seed residual, each drawn independently (so the difference's components are twice each)."""
    rng = np.random.default_rng(rng_seed)
    base = rng.uniform(0.5, 0.9, size=n_cases)
    out = {}
    for run, off in offsets.items():
        case = rng.normal(0, case_sd, n_cases)
        for s in seeds:
            level = base + off + case + rng.normal(0, seed_sd) + rng.normal(0, resid_sd, n_cases)
            out[(run, s)] = pd.DataFrame([{"case_id": f"c{i}", "region": r, "dice": level[i]}
                                          for i in range(n_cases) for r in ("WT", "TC", "ET")])
    return out


def test_the_comparison_states_the_margin_it_shows_and_the_margin_the_design_could_detect():
    from eval.stats import VarianceComponents, min_detectable_delta

    sd = {"case_sd": 0.01, "seed_sd": 0.02, "resid_sd": 0.02}
    truth = VarianceComponents(case=2 * 0.01 ** 2, seed=float("nan"), residual=float("nan"),
                               seed_diff=2 * 0.02 ** 2, residual_diff=2 * 0.02 ** 2)
    few, many = [], []
    for rep in range(30):  # null studies: the student is no worse than the reference
        for seeds, sink in ((list(range(3)), few), (list(range(9)), many)):
            out = paired_vs_first(["ref", "student"], _noisy_scores({"ref": 0.0, "student": 0.0}, seeds, **sd,
                                                                    rng_seed=rep), seeds, 0.02)
            row = out[out["region"] == "ET"].iloc[0]
            assert row["shown at margin"] == pytest.approx(max(-row["ci_low"], 0.0), abs=1e-3)
            assert row["non-inferior (margin 0.02)"] == (row["shown at margin"] < 0.02)
            sink.append(row["detectable margin"])
    # the plug-in margin tracks the design's true one, and more seeds detect a smaller margin
    for seeds, values in ((3, few), (9, many)):
        true_mde = min_detectable_delta(truth, 12, seeds, paired=True)
        assert 0.6 * true_mde < np.median(values) < 1.5 * true_mde, (seeds, np.median(values), true_mde)
    assert np.median(many) < 0.7 * np.median(few)
    # one seed: no seed component to measure, so no detectable margin is claimed
    one = paired_vs_first(["ref", "student"], _noisy_scores({"ref": 0.0, "student": 0.0}, [0], **sd), [0], 0.02)
    assert one["detectable margin"].isna().all()

"""eval.report: a whole report from a small hand-made study folder."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest

from tests.conftest import make_toy_case

MODS = ("t1", "t1ce", "t2", "flair")


def _write_cohort(man, cohort, source, items, **extra):
    from cohort.manifest import append_rows, make_row
    from cohort.nifti import write_array

    affine = np.diag([9.0, 9.0, 9.0, 1.0])
    affine[:3, 3] = [-72.0, -90.0, -72.0]
    rows = []
    for cid, split, images, label, parent in items:
        paths = {m: write_array(man.parent / cid / f"{cid}_{m}.nii.gz", images[m], affine) for m in MODS}
        lp = write_array(man.parent / cid / f"{cid}_seg.nii.gz", label, affine)
        kw = dict(extra, parent_case_id=parent) if parent else extra
        rows.append(make_row(man, case_id=cid, cohort=cohort, source=source, split=split, images=paths, label=lp,
                             shape=label.shape, spacing=(9, 9, 9), **kw))
    append_rows(man, rows)


def _per_case(rng, test_set, case_ids):
    rows = []
    effects = {"1:0": (6, 0, 0.0), "0:1": (0, 6, -0.15), "1:1": (6, 6, 0.04), "1:2@edited": (6, 12, 0.06)}
    base = rng.uniform(0.5, 0.8, len(case_ids))
    for mix, (n_r, n_s, eff) in effects.items():
        for seed in (0, 1):
            for cid, b in zip(case_ids, base):
                for region in ("WT", "TC", "ET"):
                    d = float(np.clip(b + eff + rng.normal(0, 0.02), 0, 1))
                    rows.append({"run": f"{mix}-monai-s{seed}", "mix": mix, "n_real": n_r, "n_synth": n_s,
                                 "backend": "monai", "seed": seed, "test_set": test_set, "case_id": cid,
                                 "region": region, "dice": d, "hd95": 40 * (1 - d)})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A study folder: phantom-v1-named real cohort (6 train, 3 test), one synthetic cohort (2 samples for each of
    3 masks), per_case.csv with a default and an external test set, study.json."""
    from eval.results import write_results

    study = tmp_path_factory.mktemp("study")
    rng = np.random.default_rng(0)
    real = []
    for i in range(9):
        images, label = make_toy_case(rng)
        real.append((f"ph_{i:03d}", "train" if i < 6 else "test", images, label, None))
    _write_cohort(study / "cohort" / "data_manifest.csv", "phantom-v1", "real", real)
    syn = []
    for cid, _, images, label, _ in real[:3]:
        for k in range(2):
            noisy = {m: (a + rng.normal(0, 0.1, a.shape)).astype(np.float32) for m, a in images.items()}
            syn.append((f"syn_{cid}_{k}", "train", noisy, label, cid))
    _write_cohort(study / "synthetic" / "study-real-masks" / "data_manifest.csv", "study-real-masks", "synthetic",
                  syn, generator_checkpoint="ckpt.safetensors", sampler="ddim", steps=10, seed=0)
    # the quality gate: 4 of the 6 cases passed, 2 still failed after a redraw (quality_report.csv: 8 draws)
    from cohort.manifest import load_manifest, write_manifest

    syn_man = study / "synthetic" / "study-real-masks" / "data_manifest.csv"
    df = load_manifest(syn_man)
    df["quality_gate"] = ["pass", "pass", "fail", "pass", "fail", "pass"]
    write_manifest(df, syn_man)
    pd.DataFrame({"case_id": [c for c in df["case_id"] for _ in range(2 if c in set(df["case_id"][[2, 4]]) else 1)],
                  "attempt": [0, 0, 0, 1, 0, 0, 1, 0], "seed": range(8), "passed": [1, 1, 0, 0, 1, 0, 0, 1],
                  "failures": ["", "", "texture brain/t1: 0.3 outside [0, 0.2]",
                               "texture brain/t1: 0.3 outside [0, 0.2]", "",
                               "median ED/flair: 0.1 outside [0.4, 0.9]; texture brain/t2: 0.4 outside [0, 0.2]",
                               "texture brain/t1: 0.3 outside [0, 0.2]", ""]}).to_csv(
        syn_man.parent / "quality_report.csv", index=False)
    per_case = pd.concat([_per_case(rng, "test", [f"ph_{i:03d}" for i in range(6, 9)] * 1),
                          _per_case(rng, "brats-ext", [f"ext_{i}" for i in range(4)])], ignore_index=True)
    write_results(study, per_case=per_case)
    (study / "study.json").write_text(json.dumps({
        "parameters": {"mixes": ["1:0", "0:1", "1:1", "1:2@edited"], "n_real": 6, "medddpm_on": "selected"},
        "cohort": {"manifest": "cohort/data_manifest.csv", "train_case_ids": [r[0] for r in real[:6]]},
        "hashes": {"cohort": "ab" * 32}, "versions": {"monai": "1.6.1", "torch": "2.14.1"},
        "wall_seconds": {"cohort": 1.5, "medddpm": 12.0},
        "test_sets": [{"name": "test", "manifest": "x", "n": 3}, {"name": "brats-ext", "manifest": "y", "n": 4}]}))
    return study


def test_write_results_validates_and_appends(tmp_path):
    from core.errors import InputError
    from eval.results import write_results

    rng = np.random.default_rng(0)
    df = _per_case(rng, "test", ["a", "b"])
    with pytest.raises(InputError, match="per_case.csv.*lacks columns.*hd95"):
        write_results(tmp_path, per_case=df.drop(columns=["hd95"]))
    write_results(tmp_path, per_case=df)
    again = df.copy()
    again["dice"] = 0.5
    write_results(tmp_path, per_case=again.iloc[:3])          # same keys: replaced, not duplicated
    back = pd.read_csv(tmp_path / "results" / "per_case.csv")
    assert len(back) == len(df) and (back["dice"] == 0.5).sum() == 3


def test_build_report_from_fixture_study(study):
    from eval.memorisation import ANATOMY_NOTE
    from eval.records import StudyRecord
    from eval.report import PHANTOM_NOTE, build_report
    from eval.results import evaluate_synthesis, write_results

    written = evaluate_synthesis(study, real_manifest=study / "cohort" / "data_manifest.csv",
                                 train_ids=StudyRecord.read(study).generator_train_ids(), max_pairs=20)
    syn = pd.read_csv(written["synthesis"])
    assert {"ms_ssim_within_mask", "ms_ssim_across_masks", "ms_ssim_real", "mmd"} <= set(syn["metric"])
    write_results(study, synthesis=syn)                     # re-writing the same keys does not duplicate rows
    assert len(pd.read_csv(written["synthesis"])) == len(syn)
    mem = pd.read_csv(written["memorisation"])
    assert (mem["kind"] == "calibration").sum() == 3 and (mem["kind"] == "synthetic").sum() == 6
    # noisy copies of training images conditioned on their own masks: the owner is the nearest neighbour
    s = mem[mem["kind"] == "synthetic"]
    assert (s["nn_case_id"] == s["owner_case_id"]).all()

    out = build_report(study)
    for name in ("results.csv", "report.md", "report.html", "dice_by_ratio.png", "dice_boxplots.png",
                 "dice_by_ratio_brats-ext.png", "montage_study-real-masks.png", "memorisation.png"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000
    md = (out / "report.md").read_text()
    for mix in ("1:0", "0:1", "1:1", "1:2@edited"):
        assert f"| {mix} |" in md
    assert "real only" in md and "synthetic only" in md and "real + synthetic" in md
    assert PHANTOM_NOTE in md and ANATOMY_NOTE in md
    assert "test set 'brats-ext' (external)" in md          # the external test set gets its own table
    # versions and wall times from study.json, as rows of their tables (not just words found in a heading)
    assert "| monai | 1.6.1 |" in md and "| torch | 2.14.1 |" in md and "| medddpm | 12.0 |" in md
    # paper order within the table: real only, synthetic only, then real + synthetic by ratio
    order = [md.index(f"| {k} |") for k in ("real only | 1:0", "synthetic only | 0:1", "real + synthetic | 1:1",
                                             "real + synthetic | 1:2@edited")]
    assert order == sorted(order)
    html_text = (out / "report.html").read_text()
    ET.fromstring(html_text.split("\n", 1)[1])                 # well-formed (XHTML-parsable) after the doctype
    assert html_text.count("data:image/png;base64,") >= 5       # self-contained
    res = pd.read_csv(out / "results.csv")
    assert set(res["test_set"]) == {"test", "brats-ext"}
    assert not [c for c in res.columns if c.endswith(("_x", "_y"))], list(res.columns)  # no merge leftovers
    assert {"n_seeds", "n_seeds_reference", "family", "p_holm"} <= set(res.columns)
    d = res[(res["mix"] == "1:1") & (res["region"] == "WT") & (res["test_set"] == "test")].iloc[0]
    assert d["reference_mix"] == "1:0" and d["delta_mean"] > 0
    # deterministic: rebuilding gives the same tables
    first = (out / "results.csv").read_bytes()
    build_report(study)
    assert (out / "results.csv").read_bytes() == first


def test_report_shows_the_quality_gate_per_synthetic_cohort(study):
    from eval.report import build_report, gate_table

    t = gate_table(study)
    assert t.to_dict("records")[0] == {
        "synthetic cohort": "study-real-masks", "cases": 6, "passed": 4, "failed (kept)": 2, "not judged": 0,
        "pass rate": "0.667", "draws": 8,
        "most frequent failed checks": "texture brain/t1 (3), median ED/flair (1), texture brain/t2 (1)"}
    md = (build_report(study) / "report.md").read_text()
    assert "## Synthetic images: quality gate" in md and "| study-real-masks | 6 | 4 | 2 | 0 | 0.667 | 8 |" in md


def test_report_cli_and_missing_results(study, tmp_path):
    from medddpm.cli import main

    assert main(["report", str(study)]) == 0
    assert main(["report", str(tmp_path)]) == 2            # InputError naming results/per_case.csv
    # a study with one mix and no synthetic data still gets a report (no paired column values)
    from eval.report import build_report
    from eval.results import write_results

    only = _per_case(np.random.default_rng(1), "test", ["a", "b", "c"])
    write_results(tmp_path, per_case=only[only["mix"] == "1:1"])
    out = build_report(tmp_path)
    md = (out / "report.md").read_text()
    assert "| 1:1 |" in md and "No synthetic cohort" in md and "results/memorisation.csv absent" in md


def test_study_record_round_trip_and_bad_file(tmp_path):
    """study.json is one typed record: what flows writes, eval and regenerate read back; a malformed file is
    refused naming the file; rewriting an unchanged record leaves the file untouched."""
    from core.errors import InputError
    from eval.records import CohortRecord, StudyRecord, TestSetRecord

    assert StudyRecord.read(tmp_path) is None
    rec = StudyRecord(study="augment-study:abc", parameters={"medddpm_on": "selected", "n_real": 2},
                      cohort=CohortRecord(manifest="cohort/data_manifest.csv", train_case_ids=["a", "b"]),
                      test_sets=[TestSetRecord(name="test", manifest="/x.csv", n=3)], checkpoint=None)
    path = rec.write(tmp_path)
    back = StudyRecord.read(tmp_path)
    assert back == rec and back.generator_train_ids() == ["a", "b"]
    assert back.study_path(tmp_path, back.cohort.manifest) == tmp_path / "cohort" / "data_manifest.csv"
    assert json.loads(path.read_text())["checkpoint"] is None  # every field is written, even when empty
    mtime = path.stat().st_mtime_ns
    back.write(tmp_path)
    assert path.stat().st_mtime_ns == mtime
    every = StudyRecord(parameters={"medddpm_on": "all"}, cohort=CohortRecord(train_case_ids=["a"]))
    assert every.generator_train_ids() is None  # Med-DDPM saw every real training case
    path.write_text(json.dumps({"runs": [{"config": {}}]}))  # a run without its name
    with pytest.raises(InputError, match="study.json.*runs"):
        StudyRecord.read(tmp_path)


def test_report_opens_with_one_finding_per_mix_and_region():
    """Known paired differences: a clear gain, a clear loss and noise around 0 give the three verdicts."""
    from eval.report import findings
    from eval.stats import label_families, paired_vs_real

    rng = np.random.default_rng(1)
    rows = []
    effects = {"1:0": (8, 0, 0.0), "0:1": (0, 8, -0.2), "1:1": (8, 8, 0.15), "1:2@edited": (8, 16, 0.0)}
    for mix, (n_r, n_s, eff) in effects.items():
        for c in range(12):
            base = 0.5 + 0.02 * c
            # 1:2@edited: differences of +-0.05 around 0 (mean 0, a CI across 0); the others: small noise
            d = base + eff + ((0.05 if c % 2 else -0.05) if mix == "1:2@edited" else rng.normal(0, 0.005))
            rows.append({"run": mix, "mix": mix, "n_real": n_r, "n_synth": n_s, "backend": "monai", "seed": 0,
                         "test_set": "test", "case_id": f"c{c}", "region": "TC", "dice": d, "hd95": 1.0})
    lines = findings(label_families(paired_vs_real(pd.DataFrame(rows)), primary_region="TC", primary_test_set="test"))
    assert len(lines) == 3 and all(line.startswith("Primary — ") for line in lines)
    assert all("one seed on a side" in line for line in lines)          # its interval cannot see training noise
    by_mix = {line.split(" — ")[1].split(",")[0]: line for line in lines}
    delta = lambda line: float(line.split("Δ Dice ")[1].split(" ")[0])  # noqa: E731
    assert "significantly worse" in by_mix["0:1"] and delta(by_mix["0:1"]) == pytest.approx(-0.2, abs=0.01)
    assert "significantly better" in by_mix["1:1"] and delta(by_mix["1:1"]) == pytest.approx(0.15, abs=0.01)
    assert "no significant difference" in by_mix["1:2@edited"]


def test_built_report_states_the_findings_first(study):
    from eval.report import build_report

    md = (build_report(study) / "report.md").read_text()
    first = md.index("## What this study found (test set 'test')")
    assert first < md.index("## Power: the smallest Δ this study could detect") < md.index("## Dice by training mix")
    # the declared primary comparison (default: mean Dice over WT/TC/ET on the study's test set), then the rest:
    # one sentence per mix, region (+ mean) and test set
    assert md.count("- Primary — 0:1, mean, test set 'test':") == 1 and md.count("- Primary — ") == 3
    assert md.count("— 0:1, ") == 8 and md.count("- Secondary — 1:2@edited, ") == 7
    assert md.index("- Primary — ") < md.index("- Secondary — ")
    assert "t interval, variance = case component + each mix's seed component" in md    # the method is named
    # 3 test cases x 2 seeds cannot see the paper's +0.014: the report says so
    assert "This study was too small to see the paper's effect" in md


def test_holm_adjustment_can_withdraw_a_verdict():
    """Two primary comparisons at p 0.03 and 0.04: each unadjusted interval excludes 0, neither survives Holm."""
    from eval.report import findings

    rows = [{"mix": m, "backend": "monai", "test_set": "test", "region": "mean", "reference_mix": "1:0",
             "delta_mean": 0.05, "delta_ci_low": 0.004, "delta_ci_high": 0.096, "p_value": p, "p_holm": 0.06,
             "n_seeds": 3, "n_seeds_reference": 3, "family": "primary"} for m, p in (("1:1", 0.03), ("1:2", 0.04))]
    lines = findings(pd.DataFrame(rows), {("monai", "test", "mean"): 0.3})
    assert all("not significant after the Holm adjustment" in line for line in lines)
    rows[0]["p_holm"] = 0.2
    rows[0]["delta_ci_low"] = -0.01
    line = findings(pd.DataFrame(rows[:1]), {("monai", "test", "mean"): 0.3})[0]
    assert "no significant difference detected" in line and "only a |Δ| of 0.300 or more" in line


def test_report_says_where_the_generator_came_from_and_what_it_saw(tmp_path):
    """The generator paragraph reads the training run's own config.json: fine-tuned from a shipped generator (with
    its card's pre-training cohort) or trained from scratch, on the selected cases or on all of them."""
    from eval.records import CheckpointRecord, StudyRecord
    from eval.report import generator_note

    init = tmp_path / "shipped.safetensors"
    init.with_suffix(".json").write_text(json.dumps({"steps": 4000, "train_cases": 100,
                                                     "pretrain_cohort": {"seed": 1000}}))
    (tmp_path / "medddpm").mkdir()
    cfg = {"steps": 300, "train_cases": [f"c{i}" for i in range(8)], "init_from": str(init)}
    (tmp_path / "medddpm" / "config.json").write_text(json.dumps(cfg))
    record = StudyRecord(parameters={"medddpm_on": "selected"}, checkpoint=CheckpointRecord(path="g", sha256="0"))
    note = generator_note(tmp_path, record)
    assert "fine-tuned for 300 steps on 8 real cases" in note and "selected" in note
    assert "4000 steps on 100 phantom training cases drawn with cohort seed 1000" in note
    cfg.pop("init_from")
    (tmp_path / "medddpm" / "config.json").write_text(json.dumps(cfg))
    all_record = StudyRecord(parameters={"medddpm_on": "all"}, checkpoint=CheckpointRecord(path="g", sha256="0"))
    assert generator_note(tmp_path, all_record).startswith("Med-DDPM: trained from scratch for 300 steps on 8 real "
                                                           "cases (every real training case")
    assert generator_note(tmp_path, StudyRecord(parameters={})) is None  # no synthetic data, no paragraph


def test_synthetic_only_ratio_has_an_interval_per_backend():
    """Per back end (never pooled), against the real-only run of as many real cases, with a delta-method
    interval that contains the ratio and widens with seed noise."""
    from eval.report import synthetic_only_ratio

    rng = np.random.default_rng(3)
    rows = []
    for backend, real_dice, syn_dice in (("monai", 0.8, 0.4), ("nnunet", 0.6, 0.6)):
        for mix, n_r, n_s, level in (("1:0", 8, 0, real_dice), ("0:1", 0, 8, syn_dice)):
            for seed in range(3):
                off = rng.normal(0, 0.01)
                for c in range(12):
                    rows.append(dict(run=f"{mix}-{backend}-s{seed}", mix=mix, n_real=n_r, n_synth=n_s,
                                     backend=backend, seed=seed, test_set="test", case_id=f"c{c}", region="WT",
                                     dice=level + off + rng.normal(0, 0.02), hd95=1.0))
    lines = synthetic_only_ratio(pd.DataFrame(rows))
    assert len(lines) == 2 and "back end monai" in lines[0] and "back end nnunet" in lines[1]
    assert "8 synthetic cases" in lines[0] and "(1:0, 8 real cases)" in lines[0]
    ratio = lambda line: [float(x) for x in re.search(r"= ([\d.]+)× \[([\d.]+), ([\d.]+)\]", line).groups()]  # noqa: E731
    r, lo, hi = ratio(lines[0])
    assert r == pytest.approx(0.5, abs=0.03) and lo < r < hi and hi - lo < 0.1
    r, lo, hi = ratio(lines[1])
    assert r == pytest.approx(1.0, abs=0.03) and lo < 1.0 < hi
    assert synthetic_only_ratio(pd.DataFrame(rows)[lambda d: d["mix"] == "1:0"]) == []  # no synthetic-only mix


def test_primary_comparison_is_declared_in_the_study_parameters(study, tmp_path):
    """StudyParams.primary names the primary region (default 'mean', which keeps every published study_key); the
    report reads it from study.json."""
    from core.errors import ConfigError
    from eval.report import build_report
    from flows.plan import StudyParams

    assert StudyParams(primary="mean").study_key == StudyParams().study_key
    assert StudyParams(primary="TC").study_key != StudyParams().study_key
    with pytest.raises(ConfigError, match="primary"):
        StudyParams(primary="NCR")
    record = json.loads((study / "study.json").read_text())
    record["parameters"]["primary"] = "TC"
    (study / "study.json").write_text(json.dumps(record))
    try:
        md = (build_report(study) / "report.md").read_text()
    finally:
        record["parameters"].pop("primary")
        (study / "study.json").write_text(json.dumps(record))
    assert "the study parameter 'primary' = 'TC'" in md
    assert md.count("- Primary — ") == 3 and "- Primary — 0:1, TC, test set 'test'" in md


def test_report_states_fidelity_against_held_out_cases_and_memorisation_against_its_baseline(study, tmp_path):
    """The held-out fidelity rows give one sentence with both distances and the excess; the memorisation figure is
    the owner-similarity gap against the held-out samples, with its interval; the retired measures are gone."""
    import shutil

    from eval.memorisation import MEMORISATION_COLUMNS
    from eval.report import build_report
    from eval.results import write_results
    from eval.synthesis import HOLDOUT_POOL, SYNTHESIS_COLUMNS

    s = tmp_path / "s"
    shutil.copytree(study, s)
    fid = pd.DataFrame([
        {"synthetic_id": HOLDOUT_POOL, "metric": m, "region": "", "value": v, "sd": np.nan, "ci_low": lo,
         "ci_high": hi, "n": 3, "reference": "held-out real cases", "feature_extractor": "radiomics",
         "settings": "3 held-out masks vs 5 other held-out real cases"}
        for m, v, lo, hi in (("fidelity_frd", 260.0, 200.0, 330.0), ("fidelity_frd_real", 120.0, 90.0, 160.0),
                             ("fidelity_frd_excess", 140.0, 60.0, 210.0))], columns=list(SYNTHESIS_COLUMNS))
    write_results(s, synthesis=fid)

    def mem_rows(sid, owners, sims):
        return [{"synthetic_id": sid, "kind": "synthetic", "case_id": f"{sid}_{o}", "nn_case_id": "ph_000",
                 "nn_similarity": x, "owner_case_id": o, "owner_similarity": x, "mask_similarity": 0.3,
                 "threshold": 0.95, "threshold_rule": "max", "copy_nn": False, "copy_owner": False,
                 "above_painted_mask": True, "similarity": "pearson-in-brain"} for o, x in zip(owners, sims)]

    mem = pd.DataFrame(mem_rows("study-real-masks", ["ph_000", "ph_001", "ph_002"], [0.90, 0.92, 0.95])
                       + mem_rows(HOLDOUT_POOL, ["ph_006", "ph_007", "ph_008"], [0.70, 0.72, 0.69]),
                       columns=list(MEMORISATION_COLUMNS))
    write_results(s, memorisation=mem, append=False)
    md = (build_report(s) / "report.md").read_text()
    assert ("Fidelity on 3 held-out masks (radiomics Fréchet distance to other held-out real cases, 95 % bootstrap "
            "intervals): synthetic 260.00 [200.00, 330.00], the real images of the same masks 120.00 [90.00, 160.00], "
            "excess 140.00 [60.00, 210.00] — the samples are farther from the held-out real cases than real images "
            "are") in md
    line = next(x for x in md.splitlines() if x.startswith("**Memorisation, study-real-masks:"))
    assert "owner similarity 0.923 on the masks of 3 training cases vs 0.703 on 3 held-out masks, gap +0.220 [" in line
    assert "the generator reproduces its training patients" in line
    assert "frac_above_painted_mask" in md
    for retired in ("frac_beyond_mask", "frechet_distance_real_floor", "the memorisation signal"):
        assert retired not in md

"""The staged study arm "0:1>1:0" (synthetic pre-training, real fine-tuning; docs/decisions/0020): mix parsing, the
plan reusing the study's 0:1 run, the MONAI weights carrying over, refusals, the report's rows, and the
train-segmenters subflow chaining a fine-tuning to its pre-training. nnU-Net's plan transfer:
tests/test_segment_nnunet.py."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import ConfigError, InputError
from core.fsutil import sha256_file
from flows.mixes import Mix, SynthesisPlan, parse_mixes, trainings_per_seed
from segment import api, monai_backend
from segment.config import SegmenterConfig

TRAIN = ["toy_000", "toy_001", "toy_002", "toy_003"]
PRE = ["toy_004", "toy_005"]  # the "pre-training pool" of these unit tests (any cases other than the fine-tuning's)
TINY = dict(profile="tiny", seed=0, epochs=2, iters_per_epoch=2)


# ------------------------------------------------------------------------------------------------ mixes

def test_staged_mix_parses_to_a_canonical_label_and_slug():
    m = Mix.parse(" 0:1 > 1:0 ")
    assert (m.label, m.slug) == ("0:1>1:0", "r0-s1-then-r1-s0")
    assert m.pretrain == Mix(0, 1) and m.finetune == Mix(1, 0) and m.stages == [Mix(0, 1), Mix(1, 0)]
    assert m.counts(8) == (8, 0)  # what the fine-tuning trains on itself
    assert m.seen(8) == (8, 8)  # per_case.csv's n_real, n_synth: never taken for real only
    assert Mix.parse("0:1@edited>1:0").label == "0:1@edited>1:0"
    assert parse_mixes(["1:0", "0:1>1:0"])[1] == m
    # the pre-training pool counts for synthesis like any mix's
    assert SynthesisPlan.for_mixes(parse_mixes(["1:0", "0:2@edited>1:0"]), 4) == SynthesisPlan(0, 8, 2)


@pytest.mark.parametrize("text,match", [
    ("1:0>1:0", "'1:0>1:0'.*pre-training mix '1:0' has no synthetic"),
    ("0:1>0:1", "'0:1>0:1'.*fine-tuning mix '0:1' has no real"),
    ("0:1>1:0>1:0", "'0:1>1:0>1:0'.*one '>' at most"),
    ("x>1:0", "'x>1:0'.*not of the form"),
])
def test_bad_staged_mixes_are_refused_naming_the_text(text, match):
    with pytest.raises(ConfigError, match=match):
        Mix.parse(text)


def test_plan_counts_the_arm_training():
    assert trainings_per_seed(parse_mixes(["1:0", "0:1", "1:2@edited"])) == 3
    assert trainings_per_seed(parse_mixes(["1:0", "0:1", "1:2@edited", "0:1>1:0"])) == 4  # 0:1 reused
    assert trainings_per_seed(parse_mixes(["1:0", "0:1>1:0"])) == 3  # its pre-training is trained too
    from flows.costs import estimate_study_cost

    base, arm = (estimate_study_cost("tiny", 3, 2, mixes, ["monai"], [0, 1])[-1]
                 for mixes in (["1:0", "0:1"], ["1:0", "0:1", "0:1>1:0"]))
    assert base.work.startswith("4 runs") and arm.work.startswith("6 runs")
    assert arm.flops == pytest.approx(base.flops * 6 / 4)


# ------------------------------------------------------------------------------------------------ plan

def test_plan_reuses_the_studys_0_1_run_as_pre_training(toy_cohort, tmp_path):
    from flows.plan import StudyParams, plan_study

    params = StudyParams(mixes=["1:0", "0:1", "0:1>1:0"], n_real=3, seeds=[0, 1], profile="tiny")
    plan = plan_study(params, toy_cohort, tmp_path)
    runs = {r.run: r for r in plan.runs}
    assert len(plan.runs) == 6  # 3 mixes x 2 seeds: the pre-training is the 0:1 run itself
    for seed in (0, 1):
        arm = runs[f"r0-s1-then-r1-s0-monai-s{seed}"]
        assert arm.pretrain_run == f"r0-s1-monai-s{seed}" and arm.evaluate
        assert arm.real_ids == plan.train_ids and arm.n_synth == 0 and arm.seed == seed
        assert arm.columns == {"run": arm.run, "mix": "0:1>1:0", "n_real": 3, "n_synth": 3, "backend": "monai",
                               "seed": seed}
        assert arm.config == runs[f"r1-s0-monai-s{seed}"].config  # same recipe and seed as real only
    assert plan.judge == "r1-s0-monai-s0"
    jobs = {j["run"]: j for j in plan.jobs({"real": (["p0", "p1", "p2"], set())})}
    assert jobs["r0-s1-then-r1-s0-monai-s1"]["case_ids"] == plan.train_ids
    assert jobs["r0-s1-then-r1-s0-monai-s1"]["pretrain_run"] == "r0-s1-monai-s1"
    assert jobs["r0-s1-monai-s1"]["case_ids"] == ["p0", "p1", "p2"] and jobs["r0-s1-monai-s1"]["evaluate"]
    # the fine-tuning comes after its pre-training (the subflow submits in this order)
    order = [r.run for r in plan.runs]
    assert order.index("r0-s1-monai-s0") < order.index("r0-s1-then-r1-s0-monai-s0")


def test_plan_trains_a_pre_training_that_is_no_arm_of_the_study(toy_cohort, tmp_path):
    from flows.plan import StudyParams, plan_study

    plan = plan_study(StudyParams(mixes=["1:0", "0:1>1:0"], n_real=3, seeds=[0], profile="tiny"), toy_cohort,
                      tmp_path)
    runs = {r.run: r for r in plan.runs}
    assert set(runs) == {"r1-s0-monai-s0", "r0-s1-monai-s0", "r0-s1-then-r1-s0-monai-s0"}
    assert not runs["r0-s1-monai-s0"].evaluate and runs["r0-s1-monai-s0"].n_synth == 3
    assert runs["r0-s1-then-r1-s0-monai-s0"].pretrain_run == "r0-s1-monai-s0"
    assert [p.count for p in plan.pools] == [3]


# ------------------------------------------------------------------------------------------------ MONAI

@pytest.fixture(scope="module")
def pretrained(toy_cohort, tmp_path_factory):
    """A tiny MONAI segmenter trained on PRE: the weights the fine-tunings start from."""
    root = tmp_path_factory.mktemp("pretrain")
    return api.train(toy_cohort, PRE, root / "pre", SegmenterConfig(**TINY)), root


def _weights(model_dir):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_monai_fine_tuning_starts_from_the_pretrained_weights(pretrained, toy_cohort, tmp_path):
    """With learning rate 0 the optimiser leaves the initial weights as they are: the fine-tuned model's weights
    are then exactly the pretrained ones (a manual load), and a from-scratch run's differ from them."""
    pre, _ = pretrained
    frozen = dict(TINY, epochs=1, lr=0.0)
    tuned = api.train(toy_cohort, TRAIN, tmp_path / "tuned", SegmenterConfig(**frozen, **api.pretrained_init(pre)))
    scratch = api.train(toy_cohort, TRAIN, tmp_path / "scratch", SegmenterConfig(**frozen))
    w_pre, w_tuned, w_scratch = _weights(pre), _weights(tuned), _weights(scratch)
    manual = monai_backend.build_network(SegmenterConfig(**TINY, modalities=["t1", "t1ce", "t2", "flair"]).resolved(),
                                         4)
    monai_backend.load_weights(manual, pre / "model.safetensors")
    assert set(w_tuned) == set(w_pre)
    assert all(torch.equal(w_tuned[k], w_pre[k]) and torch.equal(w_tuned[k], manual.state_dict()[k]) for k in w_pre)
    assert not all(torch.equal(w_scratch[k], w_pre[k]) for k in w_pre)
    # the weights' sha256 is the identity; where they lie is not
    rec = json.loads((tuned / "config.json").read_text())["config"]
    assert rec["init_sha256"] == sha256_file(pre / "model.safetensors")
    cfg = SegmenterConfig(**frozen, **api.pretrained_init(pre))
    assert cfg.identity().get("init_sha256") and "init_from" not in cfg.identity()
    assert cfg.hash() != SegmenterConfig(**frozen).hash()
    # a model without init_* keeps its config.json and hash (old model folders resume)
    assert "init_sha256" not in json.loads((scratch / "config.json").read_text())["config"]


def test_monai_fine_tuning_trains_from_there(pretrained, toy_cohort, tmp_path):
    """The normal budget: the first epoch's loss starts where the pretrained network is, below a fresh one's."""
    pre, _ = pretrained
    tuned = api.train(toy_cohort, TRAIN, tmp_path / "tuned", SegmenterConfig(**TINY, **api.pretrained_init(pre)))
    scratch = api.train(toy_cohort, TRAIN, tmp_path / "scratch", SegmenterConfig(**TINY))
    first = lambda d: float(pd.read_csv(d / "train_log.csv")["train_loss"].iloc[0])  # noqa: E731
    assert first(tuned) < first(scratch)
    assert not np.array_equal(_weights(tuned)["convInit.conv.weight"].numpy(),
                              _weights(pre)["convInit.conv.weight"].numpy())


def test_pretrained_weights_that_do_not_fit_are_refused_naming_the_file(pretrained, toy_cohort, tmp_path):
    pre, root = pretrained
    init = api.pretrained_init(pre)
    with pytest.raises(InputError, match=r"model\.safetensors.*modalities=\['t1', 't1ce', 't2', 'flair'\]"):
        api.train(toy_cohort, TRAIN, tmp_path / "a", SegmenterConfig(**TINY, modalities=["t1", "t2"], **init))
    with pytest.raises(InputError, match=r"model\.safetensors.*init_filters"):
        api.train(toy_cohort, TRAIN, tmp_path / "b", SegmenterConfig(**TINY, init_filters=4, **init))
    with pytest.raises(InputError, match=r"model\.safetensors.*sha256 differs"):
        api.train(toy_cohort, TRAIN, tmp_path / "c", SegmenterConfig(**TINY, init_from=init["init_from"],
                                                                    init_sha256="0" * 64))
    with pytest.raises(ConfigError, match="init_from and init_sha256 go together"):
        SegmenterConfig(**TINY, init_from=init["init_from"]).resolved()
    # a file of other tensors (same config on disk): the load itself refuses, naming the file
    other = root / "other"
    api.train(toy_cohort, PRE, other, SegmenterConfig(**TINY))
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "bad.safetensors"))
    net = monai_backend.build_network(SegmenterConfig(**TINY).resolved(), 4)
    with pytest.raises(InputError, match=r"bad\.safetensors.*do not fit"):
        monai_backend.load_weights(net, tmp_path / "bad.safetensors")


# ------------------------------------------------------------------------------------------------ report

def _arm_per_case() -> pd.DataFrame:
    rng = np.random.default_rng(3)
    rows = []
    base = rng.uniform(0.5, 0.8, 6)
    for mix, n_r, n_s, eff in (("1:0", 4, 0, 0.0), ("0:1", 0, 4, -0.1), ("0:1>1:0", 4, 4, 0.05)):
        for seed in (0, 1, 2):
            for k, b in enumerate(base):
                for region in ("WT", "TC", "ET"):
                    d = float(np.clip(b + eff + rng.normal(0, 0.02), 0, 1))
                    rows.append({"run": f"{mix}-s{seed}", "mix": mix, "n_real": n_r, "n_synth": n_s,
                                 "backend": "monai", "seed": seed, "test_set": "test", "case_id": f"c{k}",
                                 "region": region, "dice": d, "hd95": 40 * (1 - d)})
    return pd.DataFrame(rows)


def test_report_rows_for_the_arm():
    from eval.report import dice_table, findings
    from eval.stats import aggregate, label_families, paired_vs_real, with_mean_region

    pc = with_mean_region(_arm_per_case())
    paired = label_families(paired_vs_real(pc), primary_region="mean", primary_test_set="test")
    arm = paired[paired["mix"] == "0:1>1:0"].set_index("region")
    assert set(arm["reference_mix"]) == {"1:0"} and bool(arm["seeds_paired"].all())
    assert arm.loc["mean", "family"] == "primary" and arm.loc["WT", "family"] == "secondary"
    assert arm.loc["mean", "delta_mean"] == pytest.approx(0.05, abs=0.02)
    table = dice_table(aggregate(pc), paired).set_index("mix")
    assert table.loc["0:1>1:0", "training data"] == "synthetic pre-train → real fine-tune"
    assert table.loc["0:1", "training data"] == "synthetic only"
    assert table.loc["0:1>1:0", "ΔWT vs real only"].startswith("+0.0")
    lines = [f for f in findings(paired) if "0:1>1:0" in f]
    assert lines[0].startswith("Primary — 0:1>1:0 (synthetic pre-train → real fine-tune), mean")
    assert "vs 1:0" in lines[0]


# ------------------------------------------------------------------------------------------------ the subflow

@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


@pytest.mark.slow
def test_subflow_fine_tunes_from_the_pre_training_run(harness, toy_cohort, tmp_path):
    """train-segmenters: the arm's training gets its pre-training run's model; a pre-training that is no arm of the
    study is trained but neither predicted nor evaluated."""
    from flows.refs import ref
    from flows.runners import segmenter_task_runner
    from flows.study import train_segmenters

    man = ref(toy_cohort)
    cfg = {"profile": "tiny", "backend": "monai", "seed": 0, "epochs": 1, "iters_per_epoch": 2}
    cols = lambda run, mix, n_r, n_s: {"run": run, "mix": mix, "n_real": n_r, "n_synth": n_s,  # noqa: E731
                                       "backend": "monai", "seed": 0}
    jobs = [{"run": "pre", "case_ids": PRE, "model_dir": str(tmp_path / "pre"), "config": cfg,
             "columns": cols("pre", "0:1", 0, 2), "pretrain_run": None, "evaluate": False},
            {"run": "arm", "case_ids": TRAIN, "model_dir": str(tmp_path / "arm"), "config": cfg,
             "columns": cols("arm", "0:1>1:0", 4, 2), "pretrain_run": "pre", "evaluate": True}]
    out = train_segmenters.with_options(task_runner=segmenter_task_runner(None, 0, 2))(
        str(tmp_path), man, jobs, [{"name": "test", "manifest": man, "case_ids": ["toy_008", "toy_009"]}])
    by_run = {r["run"]: r for r in out}
    assert by_run["pre"]["evals"] == [] and len(by_run["arm"]["evals"]) == 1
    rec = json.loads((tmp_path / "arm" / "config.json").read_text())["config"]
    assert rec["init_sha256"] == sha256_file(tmp_path / "pre" / "model.safetensors")
    assert (pd.read_csv(by_run["arm"]["evals"][0].path)["mix"] == "0:1>1:0").all()

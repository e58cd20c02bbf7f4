"""flows.plan: the study's plan from its parameters and the real cohort, without Prefect (toy cohort: 6 train,
2 val, 2 test cases)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from core.errors import InputError, ConfigError
from flows.plan import StudyParams, plan_study, pool_order


def test_plan_of_the_paper_mixes(toy_cohort, tmp_path):
    from cohort.manifest import load_manifest
    from cohort.selection import write_training_selection

    params = StudyParams(mixes=["1:0", "0:1", "1:1", "1:2@edited"], n_real=3, backends=["nnunet", "monai"],
                         seeds=[0, 1], profile="tiny", synth_seed=5, segmenter_config={"epochs": 2})
    plan = plan_study(params, toy_cohort, tmp_path)

    # the selected cases are the ones the select task writes (one draw, cohort.selection)
    written = load_manifest(write_training_selection(toy_cohort, 3, 0))
    assert plan.train_ids == sorted(written["case_id"]) and len(set(plan.train_ids)) == 3
    assert set(plan.train_ids) <= {f"toy_{i:03d}" for i in range(6)}  # train split only
    assert plan.test_ids == ["toy_008", "toy_009"]
    assert plan_study(StudyParams(n_real=3, cohort_seed=1), toy_cohort, tmp_path).train_ids != plan.train_ids

    # exactly what the largest mix per mask source needs: 3 from the real masks, 6 from 2 edits per mask
    assert [(p.name, p.count, p.seed, p.cohort_id) for p in plan.pools] == [
        ("real", 3, 5, "study-real-masks"), ("edited", 6, 6, "study-edited-masks")]
    assert plan.synthesis.edits_per_case == 2 and plan.generator_train_ids == plan.train_ids

    assert len(plan.runs) == 4 * 2 * 2
    runs = {r.run: r for r in plan.runs}
    cfg = "-cfg" + __import__("core.identity", fromlist=["content_hash"]).content_hash({"epochs": 2})[:6]
    r = runs["r1-s2-edited-monai-s1" + cfg]
    assert r.real_ids == plan.train_ids and r.n_synth == 6
    assert r.config == {"profile": "tiny", "epochs": 2, "backend": "monai", "seed": 1}
    assert r.model_dir == str(tmp_path.resolve() / "segmenters" / r.run)
    assert runs["r0-s1-nnunet-s0" + cfg].real_ids == []
    # the judge: the first real-only run of the MONAI back end (its predictions: the pools' semantic consistency)
    assert plan.judge == "r1-s0-monai-s0" + cfg
    assert [t.name for t in plan.test_sets] == ["test"] and plan.test_sets[0].manifest is None


def test_jobs_follow_the_gate_policy(toy_cohort, tmp_path):
    """fill: passing cases first, failures only to reach a mix's size; exclude: a mix short of cases stops the
    study naming the pool; keep: synthesis order."""
    pool = tmp_path / "pool.csv"
    pd.DataFrame({"case_id": ["s0", "s1", "s2"], "cohort": "p", "source": "synthetic", "split": "train",
                  "label": ["a", "b", "c"], "quality_gate": ["pass", "fail", "pass"]}).to_csv(pool, index=False)
    assert pool_order(pool, "fill") == (["s0", "s2", "s1"], {"s1"})
    assert pool_order(pool, "keep") == (["s0", "s1", "s2"], {"s1"})
    assert pool_order(pool, "exclude") == (["s0", "s2"], {"s1"})

    plan = plan_study(StudyParams(mixes=["1:0", "0:1", "2:1"], n_real=3), toy_cohort, tmp_path)
    jobs = {j["columns"]["mix"]: j for j in plan.jobs({"real": pool_order(pool, "fill")})}
    assert jobs["0:1"]["case_ids"] == ["s0", "s2", "s1"] and jobs["0:1"]["gate_failed_cases"] == 1
    assert jobs["2:1"]["case_ids"] == plan.train_ids + ["s0", "s2"] and jobs["2:1"]["gate_failed_cases"] == 0
    assert jobs["1:0"]["case_ids"] == plan.train_ids and jobs["1:0"]["columns"]["n_synth"] == 0
    with pytest.raises(InputError, match="study-real-masks.*mix 0:1 needs 3 synthetic cases but only 2"):
        plan.jobs({"real": pool_order(pool, "exclude")})


def test_holdout_pool_is_held_out_from_the_generator_and_every_segmenter(toy_cohort, tmp_path):
    """The held-out masks and the real reference are disjoint, drawn (seeded) from the real cases the generator
    never trains on, and no run takes a case from them; with medddpm_on="all" only non-train cases qualify."""
    params = StudyParams(mixes=["1:0", "0:1", "1:2@edited"], n_real=3, synth_seed=4)
    plan = plan_study(params, toy_cohort, tmp_path)
    h = plan.holdout
    held = {f"toy_{i:03d}" for i in range(10)} - set(plan.train_ids)
    assert len(h.mask_ids) == 3 and set(h.mask_ids) | set(h.reference_ids) == held  # min(8, 7 // 2) masks
    assert not set(h.mask_ids) & set(h.reference_ids) and h.mask_ids == sorted(h.mask_ids)
    assert h.cohort_id == "study-holdout-masks" and h.out_dir == str(tmp_path.resolve() / "synthetic" / h.cohort_id)
    assert h.seed not in {p.seed for p in plan.pools}
    assert all(set(r.real_ids).isdisjoint(held) for r in plan.runs)
    assert {p.name for p in plan.pools} == {"real", "edited"}  # the held-out pool is no mix's pool
    assert plan_study(params, toy_cohort, tmp_path).holdout == h  # same seed, same draw
    assert plan_study(StudyParams(n_real=3, synth_seed=5), toy_cohort, tmp_path).holdout.mask_ids != h.mask_ids
    every = plan_study(StudyParams(n_real=3, medddpm_on="all"), toy_cohort, tmp_path).holdout
    assert set(every.mask_ids) | set(every.reference_ids) == {"toy_006", "toy_007", "toy_008", "toy_009"}
    assert plan_study(StudyParams(n_real=3, holdout_masks=0), toy_cohort, tmp_path).holdout is None
    assert plan_study(StudyParams(mixes=["1:0"], n_real=3), toy_cohort, tmp_path).holdout is None  # no generator
    with pytest.raises(ConfigError, match="holdout_masks"):
        StudyParams(holdout_masks=-1)


def test_external_test_set_and_generator_data(toy_cohort, tmp_path):
    plan = plan_study(StudyParams(mixes=["1:0"], n_real=2, medddpm_on="all", external_test_manifest=str(toy_cohort)),
                      toy_cohort, tmp_path)
    assert plan.pools == [] and not plan.needs_generator and plan.generator_train_ids is None
    ext = plan.test_sets[1]
    assert ext.name == "toy" and ext.manifest == str(Path(toy_cohort).resolve()) and len(ext.case_ids) == 10


@pytest.mark.parametrize("bad, match", [(dict(gate_failures="drop"), "gate_failures"),
                                        (dict(medddpm_on="some"), "medddpm_on"),
                                        (dict(n_real=0), "n_real"),
                                        (dict(mixes=["1/2"]), "mix"),
                                        (dict(seeds=[]), "seeds")])
def test_bad_settings_raise_config_error(bad, match):
    with pytest.raises(ConfigError, match=match):
        StudyParams(**bad)


def test_bad_cohort_raises_cohort_error_naming_it(toy_cohort, tmp_path):
    with pytest.raises(InputError, match="data_manifest.csv: n_real=7 but the cohort has only 6"):
        plan_study(StudyParams(n_real=7), toy_cohort, tmp_path)


def test_study_key_and_record_parameters_are_the_flow_parameters():
    """study_key hashes the 21 result-defining parameters (not out/parallel/Dask), mixes in canonical form;
    'primary', 'holdout_masks' and 'cases_from' only where they are not the default (keys of earlier studies
    unchanged)."""
    p = StudyParams(mixes=["1:1@real", " 1 : 2 @ edited"])
    assert p.mixes == ["1:1", "1:2@edited"]
    assert len(p.as_dict()) == 21 and "out" not in p.as_dict() and p.as_dict()["primary"] == "mean"
    assert p.study_key == StudyParams(mixes=["1:1", "1:2@edited"]).study_key != StudyParams().study_key
    assert StudyParams(holdout_masks=0).study_key != StudyParams().study_key


def test_planning_imports_no_prefect():
    code = "import sys, flows.plan; sys.exit(any(m.split('.')[0] == 'prefect' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1]).returncode == 0


def test_params_picked_from_the_flow_signature_are_all_its_result_parameters():
    """Every parameter of augment_study is a StudyParams field except where and how it runs (and waits, and
    previews its Med-DDPM training)."""
    import inspect

    from flows.study import augment_study

    names = set(inspect.signature(augment_study.fn).parameters)
    assert names - set(StudyParams().as_dict()) == {"out", "parallel", "dask_address", "dask_workers", "device", "gpus",
                                                    "wait", "medddpm_preview_every"}
    assert StudyParams.pick({"n_real": 3, "out": "x", "parallel": 1}) == StudyParams(n_real=3)


def test_study_record_times_what_the_stages_made_not_the_files_given(toy_cohort, tmp_path):
    """study.json's hashes and wall times cover the stages that ran; a cohort used in place (already inside the
    study folder) and a checkpoint to reuse are the study's inputs, not stage outputs. A staged copy is one."""
    import shutil

    from cohort.selection import write_training_selection
    from flows.record import study_record
    from flows.refs import ref

    study = Path(toy_cohort).parent.resolve()  # the toy cohort lies inside this study folder
    given_checkpoint = tmp_path / "generator.safetensors"
    given_checkpoint.write_bytes(b"weights")
    params = StudyParams(cohort_manifest=str(toy_cohort), medddpm_checkpoint=str(given_checkpoint), mixes=["1:0"],
                         n_real=3, seeds=[0], profile="tiny")
    plan = plan_study(params, toy_cohort, study)
    selected = ref(write_training_selection(toy_cohort, 3, 0), seconds=0.5)

    def record(cohort):
        stages = {"cohort": cohort, "select": selected, "medddpm": ref(given_checkpoint, seconds=9.0),
                  "edit-masks": None}
        return study_record(study, plan, stages, cohort=cohort, checkpoint=None, pools={}, pool_orders={},
                            jobs=plan.jobs({}), test_sets=[], trained=[])

    in_place = record(ref(toy_cohort, seconds=1.0))
    assert in_place.hashes == {"select": selected.sha256}
    assert in_place.wall_seconds == {"select": 0.5, "segmenters (train+predict+evaluate, sum over runs)": 0}
    assert in_place.cohort.manifest == "data_manifest.csv"
    assert in_place.cohort.selected_manifest == Path(selected.path).name
    staged = ref(shutil.copy(toy_cohort, tmp_path / "staged.csv"), seconds=2.0)
    assert record(staged).hashes == {"cohort": staged.sha256, "select": selected.sha256}
    assert record(staged).wall_seconds["cohort"] == 2.0

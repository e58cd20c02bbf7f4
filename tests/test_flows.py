"""flows/: mix planning, content-hash cache keys, the synthetic-cohort registry, staging, and flows run in
Prefect's test harness (one temporary server for this module): cache reuse and recovery from a deleted result,
and the per-run fan-out on a Dask LocalCluster. The deployment path (real server, serve, kill and resume) is
tests/test_flows_server.py."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest

from core.errors import InputError, ConfigError
from flows import registry
from flows.mixes import Mix, SynthesisPlan, parse_mixes
from flows.refs import FileRef, ref

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")


@pytest.fixture(scope="module")
def harness():
    """Prefect's test harness (temporary SQLite API), once for this module's flow tests."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=300):
        yield


# --------------------------------------------------------------------------------------------- mixes

def test_mix_counts_follow_the_ratio():
    assert Mix.parse("1:0").counts(8) == (8, 0)
    assert Mix.parse("0:1").counts(8) == (0, 8)
    assert Mix.parse("1:2@edited").counts(8) == (8, 16)
    assert Mix.parse("2:1").counts(8) == (8, 4)
    assert Mix.parse(" 1 : 1 @ real ").label == "1:1"
    assert Mix.parse("1:2@edited").slug == "r1-s2-edited"


@pytest.mark.parametrize("bad", ["1/2", "0:0", "1:1@gan", "", "a:b"])
def test_bad_mixes_are_refused_with_a_clear_error(bad):
    with pytest.raises(ConfigError, match="mix"):
        parse_mixes([bad])


def test_synthesis_plan_makes_exactly_what_the_largest_mix_needs():
    plan = SynthesisPlan.for_mixes(parse_mixes(["1:0", "0:1", "1:1", "1:2@edited", "1:1@edited"]), n_real=8)
    assert (plan.from_real_masks, plan.from_edited_masks, plan.edits_per_case) == (8, 16, 2)
    assert SynthesisPlan.for_mixes(parse_mixes(["1:0"]), 8) == SynthesisPlan(0, 0, 0)
    with pytest.raises(ConfigError, match="twice"):
        parse_mixes(["1:1", "1:1@real"])


# ------------------------------------------------------------------------------------- cache keys

def test_cache_key_follows_content_not_timing(tmp_path):
    from prefect.utilities.hashing import hash_objects

    f = tmp_path / "a.txt"
    f.write_text("one")
    r1 = ref(f, seconds=1.0)
    r2 = FileRef(path=r1.path, sha256=r1.sha256, seconds=99.0)
    assert hash_objects({"x": r1}) == hash_objects({"x": r2})  # wall time is not part of the key
    assert r1.is_intact()
    f.write_text("two")
    assert not r1.is_intact()
    assert hash_objects({"x": ref(f)}) != hash_objects({"x": r1})
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "w.bin").write_bytes(b"w")
    rd = ref(d)
    (d / ".w.tmp").write_bytes(b"partial")  # atomic-write leftovers do not change a folder's identity
    assert rd.is_intact()
    (d / "sub" / "w.bin").write_bytes(b"W")
    assert not rd.is_intact()


# ---------------------------------------------------------------------------------------- registry

def _fake_cohort(study, cid, toy_cohort):
    """A registered cohort folder: a copy of one toy case with a manifest, ids prefixed by the cohort id."""
    import shutil

    from cohort.manifest import append_rows, load_manifest, make_row, resolve

    row = load_manifest(toy_cohort).iloc[0]
    folder = study / "synthetic" / cid
    folder.mkdir(parents=True)
    images = {}
    for m in ("t1", "t1ce", "t2", "flair", "label"):
        dst = folder / f"{m}.nii.gz"
        shutil.copy(resolve(toy_cohort, row[m]), dst)
        images[m] = dst
    lab = images.pop("label")
    man = folder / "data_manifest.csv"
    append_rows(man, [make_row(man, case_id=f"{cid}_0", cohort=cid, source="real", split="train", images=images,
                               label=lab, shape=(16, 20, 16), spacing=(9, 9, 9))])
    return man


def test_registry_retention_prunes_oldest_unused_only(tmp_path, toy_cohort):
    study = tmp_path / "study"
    ids = []
    for _ in range(4):
        cid = registry.next_version(study)
        man = _fake_cohort(study, cid, toy_cohort)
        registry.register(study, cid, man, ref(man).sha256, kind="regenerated", seed=1)
        ids.append(cid)
    assert ids == ["regen-v001", "regen-v002", "regen-v003", "regen-v004"]
    registry.mark_used(study, ["regen-v001"], "augment-study:abc")
    pruned = registry.prune(study, keep=2)
    assert pruned == ["regen-v002"]  # v001 is older but a finished study used it; v003, v004 are the newest 2
    left = [c["id"] for c in registry.read_registry(study)["cohorts"]]
    assert left == ["regen-v001", "regen-v003", "regen-v004"]
    assert not (study / "synthetic" / "regen-v002").exists() and (study / "synthetic" / "regen-v001").exists()
    assert registry.next_version(study) == "regen-v005"  # numbers are never reused
    merged = registry.rebuild_manifest(study)
    assert sorted(pd.read_csv(merged)["cohort"]) == left
    mtime = merged.stat().st_mtime_ns
    registry.rebuild_manifest(study)
    assert merged.stat().st_mtime_ns == mtime  # unchanged content is not rewritten
    with pytest.raises(ConfigError, match="at least 1"):
        registry.prune(study, keep=0)


# ----------------------------------------------------------------------------- staging / selection

def test_stage_and_select_keep_files_and_hashes(tmp_path, toy_cohort):
    from cohort.manifest import load_manifest, validate_manifest
    from flows import tasks

    staged = tasks.stage_cohort.fn(ref(toy_cohort), str(tmp_path / "cohort"))
    validate_manifest(staged.path, check_hashes=True)  # every file present with its recorded sha256
    sel = tasks.select_training_cases.fn(staged, 3, 0)
    again = tasks.select_training_cases.fn(staged, 3, 0)
    df = load_manifest(sel.path)
    assert sel.sha256 == again.sha256 and len(df) == 3
    assert set(df["split"]) == {"train"} and set(df["source"]) == {"real"}
    validate_manifest(sel.path, check_hashes=True)  # same data root: relative paths still resolve
    with pytest.raises(InputError, match="only 6 real training"):
        tasks.select_training_cases.fn(staged, 7, 0)


# ------------------------------------------------------------------------------ flows in the harness

def test_cached_task_is_reused_then_recomputed_when_its_output_is_deleted(harness, tmp_path, toy_cohort):
    """The flows' cache helper: a second call is a cache hit (nothing rewritten); once the output is deleted the
    cached result is stale and the task runs again."""
    from prefect import flow

    from flows import tasks
    from flows.tasks import run_cached

    @flow(name="stage-cohort-test")
    def stage(study: str):
        return run_cached(tasks.stage_cohort, tmp_path, ref(toy_cohort), study)

    out = tmp_path / "cohort"
    first = stage(str(out))
    manifest = Path(first.path)
    mtime = manifest.stat().st_mtime_ns
    assert stage(str(out)) == first and manifest.stat().st_mtime_ns == mtime  # cache hit: the task did not run
    manifest.unlink()
    again = stage(str(out))
    assert Path(again.path).exists() and again.sha256 == first.sha256
    assert (tmp_path / ".prefect" / "results").is_dir()  # results persist inside the study folder


def test_segmenter_fan_out_on_a_dask_local_cluster(harness, tmp_path, toy_cohort):
    """The per-run fan-out on prefect-dask's DaskTaskRunner (LocalCluster of 1 worker process)."""
    from cohort.manifest import load_manifest, select
    from flows.runners import segmenter_task_runner
    from flows.study import train_segmenters

    df = load_manifest(toy_cohort)
    train_ids = select(df, split="train")["case_id"].tolist()[:3]
    test_ids = select(df, split="test")["case_id"].tolist()
    man = ref(toy_cohort)
    job = {"run": "r1-s0-monai-s0", "case_ids": train_ids, "model_dir": str(tmp_path / "segmenters" / "r1"),
           "config": {"profile": "tiny", "backend": "monai", "seed": 0, "epochs": 1, "iters_per_epoch": 2},
           "columns": {"run": "r1-s0-monai-s0", "mix": "1:0", "n_real": 3, "n_synth": 0, "backend": "monai",
                       "seed": 0}}
    runner = segmenter_task_runner(None, dask_workers=1, parallel=1)
    assert type(runner).__name__ == "DaskTaskRunner"
    out = train_segmenters.with_options(task_runner=runner)(str(tmp_path), man, [job],
                                                            [{"name": "test", "manifest": man, "case_ids": test_ids}])
    scores = pd.read_csv(out[0]["evals"][0].path)
    assert sorted(scores["case_id"].unique()) == sorted(test_ids)
    assert set(scores["region"]) == {"WT", "TC", "ET"} and scores["dice"].between(0, 1).all()
    assert (scores["mix"] == "1:0").all() and (scores["test_set"] == "test").all()
    assert json.loads((tmp_path / "segmenters" / "r1" / "config.json").read_text())["train_ids"] == train_ids


def test_two_worker_threads_train_two_segmenters_at_once(harness, tmp_path, toy_cohort, monkeypatch):
    """With parallel=2 the trainings overlap in time: a prediction waiting for its training must not hold the
    second worker (it did, and the default study's trainings ran one after another)."""
    import threading
    import time

    import segment.api
    from cohort.manifest import load_manifest, select
    from flows.runners import segmenter_task_runner
    from flows.study import train_segmenters

    spans, real_train = {}, segment.api.train

    def timed_train(manifest, case_ids, out_dir, config):
        start = time.monotonic()
        time.sleep(1.0)  # longer than a thread hand-over, so that overlapping trainings must overlap here
        out = real_train(manifest, case_ids, out_dir, config)
        spans[Path(out_dir).name] = (start, time.monotonic(), threading.get_ident())
        return out

    monkeypatch.setattr(segment.api, "train", timed_train)
    df = load_manifest(toy_cohort)
    train_ids = select(df, split="train")["case_id"].tolist()[:3]
    test_ids = select(df, split="test")["case_id"].tolist()
    man = ref(toy_cohort)
    jobs = [{"run": f"r1-s0-monai-s{seed}", "case_ids": train_ids,
             "model_dir": str(tmp_path / "segmenters" / f"s{seed}"),
             "config": {"profile": "tiny", "backend": "monai", "seed": seed, "epochs": 1, "iters_per_epoch": 2},
             "columns": {"run": f"r1-s0-monai-s{seed}", "mix": "1:0", "n_real": 3, "n_synth": 0, "backend": "monai",
                         "seed": seed}} for seed in (0, 1)]
    runner = segmenter_task_runner(None, dask_workers=0, parallel=2)
    out = train_segmenters.with_options(task_runner=runner)(str(tmp_path), man, jobs,
                                                            [{"name": "test", "manifest": man, "case_ids": test_ids}])
    assert [r["run"] for r in out] == [j["run"] for j in jobs] and all(Path(r["evals"][0].path).exists() for r in out)
    (start0, end0, thread0), (start1, end1, thread1) = spans["s0"], spans["s1"]
    assert thread0 != thread1 and start1 < end0 and start0 < end1, spans


def test_default_pool_keeps_every_core_busy_to_the_end():
    """9 single-threaded trainings on 2 cores: 3 at a time (4.5 training times) instead of 2 (5, the ninth alone
    on one core); counts that divide evenly keep one per core; GPU, nnU-Net or all-core profiles keep 2."""
    from flows.runners import auto_parallel, balanced_pool_size

    assert balanced_pool_size(9, 2) == 3 and balanced_pool_size(8, 2) == 2 and balanced_pool_size(6, 2) == 2
    assert balanced_pool_size(1, 2) == 1 and balanced_pool_size(3, 2) == 3 and balanced_pool_size(12, 16) == 12
    assert balanced_pool_size(18, 16) == 18 and balanced_pool_size(33, 16) == 17  # 2 rounds of 17 share 16 cores

    def job(**cfg):
        return {"config": {"profile": "demo", "backend": "monai", "seed": 0, "device": "cpu", **cfg}}

    assert auto_parallel([job()] * 9, cores=2) == 3
    assert auto_parallel([job()] * 9, cores=16) == 9
    assert auto_parallel([job(profile="paper")] * 9, cores=2) == 2          # torch's all-core default
    assert auto_parallel([job(backend="nnunet")] * 9, cores=2) == 2


def _gpu_probe_task():
    from prefect import task

    @task(name="gpu-probe")
    def probe(i: int, log: str) -> int:
        import fcntl
        import time

        t0 = time.time()
        time.sleep(0.6)
        with open(log, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            f.write(json.dumps([i, t0, time.time()]) + "\n")
        return i

    return probe


def test_gpu_tasks_never_outnumber_the_gpus_a_dask_cluster_declares(harness, tmp_path, monkeypatch):
    """Two workers, each declaring one GPU but running 3 threads: GPU-annotated tasks (flows.runners.gpu_submit, used
    by train-segmenters) run at most 2 at a time, plain tasks up to 6; every task completes. The study's --gpus
    runner pins each of its workers to its own GPU."""
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    from flows.runners import GPU_RESOURCE, gpu_submit, segmenter_task_runner

    probe = _gpu_probe_task()
    runner = DaskTaskRunner(cluster_kwargs={"n_workers": 2, "threads_per_worker": 3, "processes": False,
                                            "resources": {"GPU": 1}, "dashboard_address": None})

    @flow(task_runner=runner)
    def fan_out(log: str, resources):
        return [f.result() for f in [gpu_submit(probe, i, log, resources=resources) for i in range(6)]]

    def max_concurrent(log):
        rows = [json.loads(line) for line in open(log)]
        events = sorted([(r[1], 1) for r in rows] + [(r[2], -1) for r in rows])
        level = peak = 0
        for _, d in events:
            level += d
            peak = max(peak, level)
        return peak, len(rows)

    gpu_log, cpu_log = tmp_path / "gpu.jsonl", tmp_path / "cpu.jsonl"
    assert fan_out(str(gpu_log), GPU_RESOURCE) == list(range(6))
    assert max_concurrent(gpu_log) == (2, 6)
    assert fan_out(str(cpu_log), None) == list(range(6))
    assert max_concurrent(cpu_log)[0] > 2  # without the annotation the threads, not the GPUs, limit
    # the study's runner for --gpus 2: one worker process per GPU, each seeing only its own GPU; GPU tasks land on both
    @task(name="visible-gpus")
    def visible_gpus(i: int) -> str | None:
        import time

        time.sleep(0.6)
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)

    @flow(task_runner=segmenter_task_runner(None, 0, 1, gpus=2))
    def on_gpus():
        return sorted(f.result() for f in [gpu_submit(visible_gpus, i, resources=GPU_RESOURCE) for i in range(4)])

    assert on_gpus() == ["0", "0", "1", "1"]


def test_transient_failures_are_retried_bad_input_is_not(harness):
    """An OSError (e.g. a file system hiccup) is retried; a InputError (bad input) fails at once."""
    from prefect import flow, task
    from prefect.cache_policies import NO_CACHE

    from flows.tasks import STUDY_TASK

    calls = {"io": 0, "bad": 0}
    opts = {**STUDY_TASK, "retry_delay_seconds": 0, "cache_policy": NO_CACHE, "persist_result": False}

    @task(**opts)
    def flaky(kind: str) -> int:
        calls[kind] += 1
        if kind == "io" and calls[kind] == 1:
            raise OSError("stale NFS handle")
        if kind == "bad":
            raise InputError("x.nii.gz", "not a readable NIfTI image")
        return calls[kind]

    @flow(name="retry-test")
    def run(kind: str):
        return flaky(kind)

    assert run("io") == 2
    with pytest.raises(InputError, match="x.nii.gz"):
        run("bad")
    assert calls["bad"] == 1


@pytest.mark.parametrize("entrypoint", ["deployment", "flows/study.py:augment_study"])
def test_flow_loaded_by_entrypoint_accepts_cached_file_refs(entrypoint):
    """Regression: a flow run loads augment-study from its deployment's entry point. Cached results
    are FileRefs of the flows package (as `medddpm study` pickled them); the loaded flow's subflow must accept
    them. A file-path entry point used to load the file as a package 'study' with its own FileRef class."""
    from prefect.flows import load_flow_from_entrypoint

    from flows.serve import build_deployments

    if entrypoint == "deployment":
        deployments = build_deployments(cron=None)
        entrypoint = deployments[0].entrypoint
        assert [d.entrypoint for d in deployments] == ["flows.study.augment_study",
                                                       "flows.regenerate.regenerate_cohort"]
    study_flow = load_flow_from_entrypoint(entrypoint)
    subflow = study_flow.fn.__globals__["train_segmenters"]
    cached = FileRef(path="/study/data_manifest.csv", sha256="0" * 64)
    params = subflow.validate_parameters({"study_dir": "/study", "manifest": cached, "jobs": [], "test_sets": []})
    assert params["manifest"] == cached


@pytest.mark.parametrize("error, retried", [(ConfigError("mixes ['1:1'] given twice"), False),
                                            (InputError("x.nii.gz", "not a readable NIfTI image"), False),
                                            (OSError("stale NFS handle"), True)])
def test_only_transient_failures_are_retried(error, retried):
    """The retry condition on a failed state: bad settings and bad input fail at once, I/O errors are retried."""
    from flows.tasks import is_transient

    class FailedState:
        def result(self):
            raise error

    assert is_transient(None, None, FailedState()) is retried

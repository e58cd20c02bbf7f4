"""The deployment path end to end, against a real Prefect server started here on loopback (tiny profile):

`prefect server start` (SQLite in a temporary PREFECT_HOME) -> `python -m flows.serve` -> `prefect deployment run
'augment-study/default'`. One run is SIGKILLed mid-way (after Med-DDPM and synthesis, during segmenter training),
the next run resumes and completes with the report, and a third run executes no task at all (every task run is
Cached). Then regenerate-cohort makes two versions with retention 1: the older is pruned, the study's pools stay.
Each test gets what it needs from fixtures (the regeneration test its finished study from `finished_study`), so
any one of them runs alone; the killed-run test needs the served study unstarted, and pytest runs it first.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
WAIT = 240  # seconds; the shared 2-core machine can be slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.25):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: process exited early with code {proc.returncode}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM, then SIGKILL the process and anything it started."""
    if proc.poll() is not None:
        return
    kids = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    for k in kids:
        if k.is_running():
            k.kill()


@pytest.fixture(scope="module")
def prefect_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect_home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_RUNNER_POLL_FREQUENCY": "1",
           "PREFECT_UI_ENABLED": "false"}
    log = open(home / "server.log", "w")
    server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT)

    def healthy():
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        _wait(healthy, WAIT, "prefect server /api/health", server)
        yield env
    finally:
        _stop(server)
        log.close()


def _external_cohort(root: Path) -> Path:
    """Two more toy cases in their own cohort (stand-in for a user's imported BraTS cases)."""
    import numpy as np

    from cohort.manifest import append_rows, make_row
    from cohort.nifti import write_array
    from tests.conftest import make_toy_case

    manifest = root / "data_manifest.csv"
    affine = np.diag([9.0, 9.0, 9.0, 1.0])
    affine[:3, 3] = [-72.0, -90.0, -72.0]
    rng = np.random.default_rng(7)
    rows = []
    for i in range(2):
        images, label = make_toy_case(rng)
        cid = f"ext_{i:03d}"
        paths = {m: write_array(root / cid / f"{cid}_{m}.nii.gz", a, affine) for m, a in images.items()}
        lab = write_array(root / cid / f"{cid}_seg.nii.gz", label, affine)
        rows.append(make_row(manifest, case_id=cid, cohort="ext-toy", source="real", split="test", images=paths,
                             label=lab, shape=label.shape, spacing=(9.0, 9.0, 9.0)))
    append_rows(manifest, rows)
    return manifest


def _tiny_params(study: Path, cohort: Path | None, **overrides) -> dict:
    """The smallest study that exercises every stage (tiny profile, a few steps of each model). cohort None:
    the embedded phantom cohort."""
    return dict(out=str(study), cohort_manifest=str(cohort) if cohort else None, profile="tiny", n_real=3, seeds=[0],
                sampler="ddim", sampling_steps=4,
                medddpm_config={"steps": 12, "checkpoint_every": 6, "progress": False},
                segmenter_config={"epochs": 2, "iters_per_epoch": 2}, **overrides)


@pytest.fixture(scope="module")
def served(prefect_env, toy_cohort, tmp_path_factory):
    """`python -m flows.serve` with tiny default parameters; stopped before the server (after it, serve hangs)."""
    root = tmp_path_factory.mktemp("served")
    study = root / "study"
    params = _tiny_params(study, toy_cohort, mixes=["1:0", "0:1", "1:1@edited"],
                          external_test_manifest=str(_external_cohort(root / "external")))
    (root / "study_params.json").write_text(json.dumps(params))
    log = open(root / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "flows.serve", "--study-params", str(root / "study_params.json"),
                              "--cron", "none"], cwd=REPO, env=prefect_env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait(lambda: _cli(prefect_env, "deployment", "ls").count("augment-study/default") > 0, WAIT,
              "the served deployments", serve, poll=1)
        yield {"serve": serve, "study": study, "root": root, "env": prefect_env}
    finally:
        _stop(serve)  # before the server: a serve process whose server is gone ignores SIGTERM
        log.close()


def _cli(env, *args, timeout=WAIT) -> str:
    out = subprocess.run([PREFECT, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return out.stdout + out.stderr


def _run_deployment(env, watch: bool, params: dict | None = None) -> str:
    """`prefect deployment run 'augment-study/default'` (``params`` override the deployment's); returns the flow
    run id."""
    args = ["deployment", "run", "augment-study/default"] + (["--watch", "--watch-interval", "1"] if watch else [])
    args += ["--params", json.dumps(params)] if params else []
    out = _cli(env, *args, timeout=900)
    m = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert m, out
    return m.group(1)


def _task_states(env, flow_run_id: str, details: bool = False) -> tuple[str, list[str]]:
    """(flow run state type, state names of every task run of the run and of its subflow runs); details: instead
    "name: state: message" of each task run that neither completed nor was cached."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def go():
        async with get_client() as c:
            run = await c.read_flow_run(flow_run_id)
            subs = await c.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run.id])))
            ids = [run.id, *[s.id for s in subs]]
            trs = await c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
            wrappers = {s.parent_task_run_id for s in subs}  # the task run standing for a subflow call
            state = run.state.type.value if run.state else "SCHEDULED"  # a just-created run may have no state yet
            kept = [t for t in trs if t.id not in wrappers and t.state]
            if details:
                return state, [f"{t.name}: {t.state.name}: {t.state.message}" for t in kept
                               if t.state.name not in ("Completed", "Cached")]
            return state, [t.state.name for t in kept]

    with temporary_settings(updates={PREFECT_API_URL: env["PREFECT_API_URL"]}):
        return asyncio.run(go())


def _why(served, flow_run_id: str) -> str:
    """What to print when a run did not complete: its unfinished task runs with their messages, the serve log's
    end."""
    _, unfinished = _task_states(served["env"], flow_run_id, details=True)
    log = (served["root"] / "serve.log").read_text(errors="replace")
    return "\n".join(unfinished) + "\n--- serve.log (end) ---\n" + log[-6000:]


def _kill_flow_run_processes(serve: subprocess.Popen) -> int:
    kids = psutil.Process(serve.pid).children(recursive=True)
    for k in kids:
        try:
            k.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    return len(kids)


@pytest.fixture(scope="module")
def finished_study(served) -> Path:
    """The served study, finished by a deployment run of its own: every task Cached when the killed-run test has
    finished it already, the whole study when a test that needs it runs alone."""
    run = _run_deployment(served["env"], watch=True)
    state, tasks = _task_states(served["env"], run)
    assert state == "COMPLETED", (state, tasks, _why(served, run))
    assert (served["study"] / "study.json").exists()
    return served["study"]


def test_deployment_run_killed_resumes_then_fully_cached(served):
    env, study = served["env"], served["study"]
    assert not (study / "study.json").exists(), "this test needs the served study unstarted: run it first"

    # 1. a run SIGKILLed while the segmenters train (Med-DDPM and synthesis are done by then)
    run1 = _run_deployment(env, watch=False)

    def training_started():
        if any((study / "segmenters").glob("*/config.json")):
            return True
        state, _ = _task_states(env, run1)
        assert state in ("SCHEDULED", "PENDING", "RUNNING"), f"first run ended early: {state}"
        return False

    _wait(training_started, 600, "segmenter training to start", served["serve"], poll=0.5)
    assert (study / "medddpm" / "generator.safetensors").exists()
    assert _kill_flow_run_processes(served["serve"]) >= 1
    assert not (study / "report").exists()

    # 2. the next run resumes: finished work is reused from the cache, the rest runs, the report is written
    run2 = _run_deployment(env, watch=True)
    state2, tasks2 = _task_states(env, run2)
    assert state2 == "COMPLETED", (state2, tasks2, _why(served, run2))
    assert "Cached" in tasks2 and "Completed" in tasks2, tasks2
    report = study / "report" / "report.md"
    assert report.exists() and "Dice" in report.read_text()
    per_case = pd.read_csv(study / "results" / "per_case.csv")
    assert set(per_case["mix"]) == {"1:0", "0:1", "1:1@edited"}
    # a non-default segmenter config names its own run folders (no clash with a default-config study)
    assert per_case["run"].str.contains(r"-s0-cfg[0-9a-f]{6}$").all(), set(per_case["run"])
    assert set(per_case["test_set"]) == {"test", "ext-toy"}  # the external cohort is its own test set
    assert set(per_case[per_case["test_set"] == "ext-toy"]["case_id"]) == {"ext_000", "ext_001"}
    assert per_case["dice"].between(0, 1).all()
    record = json.loads((study / "study.json").read_text())
    # a 12-step Med-DDPM fails synth's quality gate; the default gate_failures="fill" uses such cases only to fill
    # the mixes, and study.json counts them
    assert record["synthetic"]["real"]["gate_failures"] == "fill"
    pool = pd.read_csv(study / "synthetic" / "study-real-masks" / "data_manifest.csv")
    failed = set(pool.loc[pool["quality_gate"] == "fail", "case_id"])
    report_rows = pd.read_csv(study / "synthetic" / "study-real-masks" / "quality_report.csv")
    assert failed <= set(report_rows.loc[~report_rows["passed"].astype(bool), "case_id"])  # listed as failures
    assert record["synthetic"]["real"]["n"] == len(pool) == 3
    assert record["synthetic"]["real"]["gate_failed"] == len(failed)
    # the 0:1 mix takes all 3 cases of the real-masks pool, so it trains on every gate failure of it
    synth_only = [r for r in record["runs"] if r["columns"]["mix"] == "0:1"]
    assert synth_only and all(r["gate_failed_cases"] == len(failed) for r in synth_only), synth_only
    mtimes = {p: p.stat().st_mtime_ns for p in study.rglob("*") if p.is_file() and ".prefect" not in p.parts}

    # 3. a rerun of the finished study executes no task and rewrites no file
    run3 = _run_deployment(env, watch=True)
    state3, tasks3 = _task_states(env, run3)
    assert state3 == "COMPLETED", (state3, _why(served, run3))
    assert tasks3 and set(tasks3) == {"Cached"}, tasks3
    changed = [str(p) for p, t in mtimes.items() if p.stat().st_mtime_ns != t]
    assert not changed, changed


def test_regenerate_cohort_versions_and_retention(served, finished_study):
    """Two regenerations with retention 1 (run as `medddpm regenerate-cohort`, reporting to the test server): new
    seeds per version, the older regenerated cohort pruned, the study's own pools kept."""
    from cohort.manifest import load_manifest
    from flows.registry import read_registry

    env, study = served["env"], finished_study
    medddpm = str(Path(sys.executable).parent / "medddpm")
    for _ in range(2):
        out = subprocess.run([medddpm, "regenerate-cohort", "--study", str(study), "--count", "2", "--steps", "3",
                              "--keep", "1", "--max-gate-failures", "2"], env=env, cwd=REPO, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    reg = {c["id"]: c for c in read_registry(study)["cohorts"]}
    assert "regen-v001" not in reg and not (study / "synthetic" / "regen-v001").exists()
    assert reg["regen-v002"]["seed"] == 10_002 and reg["regen-v002"]["gate"]["cases"] == 2
    assert {"study-real-masks", "study-edited-masks"} <= set(reg)  # used by the finished study: kept
    assert all(reg[p]["used_by"] for p in ("study-real-masks", "study-edited-masks"))
    new = load_manifest(study / "synthetic" / "regen-v002" / "data_manifest.csv")
    ck_sha = json.loads((study / "study.json").read_text())["checkpoint"]["sha256"]
    assert set(new["cohort"]) == {"regen-v002"} and set(new["generator_checkpoint"]) == {ck_sha}
    merged = load_manifest(study / "synthetic" / "data_manifest.csv")
    assert set(merged["cohort"]) == {"regen-v002", "study-real-masks", "study-edited-masks"}


def test_deployment_after_a_cli_study_completes_from_the_cache(served):
    """Regression: a study finished by `medddpm study` (the flow called directly, as `make study` does:
    embedded phantom cohort), then `prefect deployment run 'augment-study/default'` on the same folder: the
    deployment completes from the cache. It used to fail in the train-segmenters subflow ("manifest: Input should
    be a valid dictionary or instance of FileRef"): the deployment loaded flows/study.py by file path, which made
    a second FileRef class, and the cached FileRefs written by the CLI run were not instances of it."""
    env, root = served["env"], served["root"]
    study = root / "cli-study"
    params = _tiny_params(study, None, n_cases=6, mixes=["1:0", "0:1"], external_test_manifest=None)
    (root / "cli_params.json").write_text(json.dumps(params))
    medddpm = str(Path(sys.executable).parent / "medddpm")
    out = subprocess.run([medddpm, "study", "--out", str(study), "--params", str(root / "cli_params.json")], env=env,
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (study / "report" / "report.md").exists()

    run = _run_deployment(env, watch=True, params=params)
    state, task_states = _task_states(env, run)
    assert state == "COMPLETED", (state, task_states, _why(served, run))
    assert task_states and set(task_states) == {"Cached"}, task_states

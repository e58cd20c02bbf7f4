"""Nothing damaged is reused on resume, one run owns a folder, and the failures a user can cause end in one line
(issue 32; docs/decisions/0017-integrity-and-locks.md).

Each kind of artifact is damaged by flipping one byte in its middle and the command is rerun: the generator is
rebuilt from the training state (same bytes), a damaged training state is refused naming the file, a synthetic
image or label is drawn again with its seed (same bytes), a cached study result whose files changed is recomputed
or named; `medddpm verify` lists the damage; two runs on one folder: the second says who holds it; a run killed
with SIGKILL while holding the lock is taken over with a warning."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.errors import InputError
from core.fsutil import sha256_file
from core.lock import FolderBusy, FolderTakenOver, folder_lock, read_owner

REPO = Path(__file__).resolve().parents[1]
FAST = {"num_threads": 1, "progress": False, "steps": 6, "checkpoint_every": 3}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------------------- Med-DDPM training

@pytest.fixture(scope="module")
def trained(toy_cohort, tmp_path_factory) -> Path:
    from synth.train import train_medddpm

    out = tmp_path_factory.mktemp("integrity_train")
    return train_medddpm(toy_cohort, "tiny", out, FAST)


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_damaged_generator_is_rebuilt_from_the_training_state(trained, toy_cohort, tmp_path):
    from synth.train import train_medddpm, training_damage

    out = _copy(trained.parent, tmp_path / "run")
    gen = out / "generator.safetensors"
    good = sha256_file(gen)
    flip_byte(gen)
    assert [p.name for p, _ in training_damage(out)] == ["generator.safetensors"]
    train_medddpm(toy_cohort, "tiny", out, FAST)
    assert sha256_file(gen) == good  # the same bytes, from the state's EMA weights
    assert training_damage(out) == []


def test_damaged_training_state_is_refused_naming_it(trained, toy_cohort, tmp_path):
    from synth.train import train_medddpm

    out = _copy(trained.parent, tmp_path / "run")
    state = out / "checkpoints" / "last.pt"
    flip_byte(state)
    with pytest.raises(InputError, match="damaged.*training record.*train again from step 0") as e:
        train_medddpm(toy_cohort, "tiny", out, FAST)
    assert e.value.path == str(state) and "\n" not in str(e.value)


def test_damaged_intensity_ranges_are_recomputed(trained, toy_cohort, tmp_path):
    from synth.train import train_medddpm

    out = _copy(trained.parent, tmp_path / "run")
    ranges = out / "intensity_ranges.json"
    good = sha256_file(ranges)
    ranges.write_text(ranges.read_text().replace("0", "1", 1))
    train_medddpm(toy_cohort, "tiny", out, FAST)
    assert sha256_file(ranges) == good


def test_ranges_of_an_older_gate_format_are_rebuilt_by_the_training_command(trained, toy_cohort, tmp_path, capsys):
    """A finished run's folder with a medddpm-gate-v2 file (refused by synthesis) gets the current gate from the same
    training command, and its record follows, so the next rerun finds nothing to rebuild."""
    import json

    from synth.quality import GATE_FORMAT, load_ranges
    from synth.train import train_medddpm, training_damage

    out = _copy(trained.parent, tmp_path / "run")
    ranges = out / "intensity_ranges.json"
    good = sha256_file(ranges)
    ranges.write_text(json.dumps({**json.loads(ranges.read_text()), "format": "medddpm-gate-v2"}))
    record = out / "checkpoints" / "record.json"  # as if trained when v2 was current: the record holds that file
    record.write_text(json.dumps({**json.loads(record.read_text()), "ranges_sha256": sha256_file(ranges)}))
    with pytest.raises(InputError, match="older than"):
        load_ranges(ranges)
    train_medddpm(toy_cohort, "tiny", out, FAST)
    assert sha256_file(ranges) == good and load_ranges(ranges)["format"] == GATE_FORMAT
    assert training_damage(out) == []
    capsys.readouterr()
    train_medddpm(toy_cohort, "tiny", out, FAST)
    assert "rebuilding" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- synthesis

@pytest.fixture(scope="module")
def synthesized(trained, toy_cohort, tmp_path_factory) -> Path:
    from synth.synthesize import SynthesisConfig, synthesize_cohort

    out = tmp_path_factory.mktemp("integrity_synth")
    return synthesize_cohort(trained, toy_cohort, out, SynthesisConfig(count=3, sampler="ddim", steps=3,
                                                                       progress=False, num_threads=1))


@pytest.mark.parametrize("column", ["t1", "label"])
def test_damaged_synthetic_case_is_drawn_again_with_the_same_bytes(trained, toy_cohort, synthesized, tmp_path,
                                                                   column):
    from cohort.manifest import damaged_files, load_manifest, resolve
    from synth.synthesize import SynthesisConfig, synthesize_cohort

    out = _copy(synthesized.parent, tmp_path / "pool")
    manifest = out / "data_manifest.csv"
    before = manifest.read_bytes()
    row = load_manifest(manifest).iloc[1]
    target = resolve(manifest, row[column])
    flip_byte(target)
    assert [cid for cid, _, _ in damaged_files(manifest)] == [row["case_id"]]
    synthesize_cohort(trained, toy_cohort, out, SynthesisConfig(count=3, sampler="ddim", steps=3, progress=False,
                                                                num_threads=1))
    assert damaged_files(manifest) == []
    assert manifest.read_bytes() == before  # same rows, same order, same hashes: downstream caches still hold


# ----------------------------------------------------------------------------------------- locks

def test_second_holder_is_refused_naming_the_owner(tmp_path):
    with folder_lock(tmp_path / "f", what="test") as me:
        code = ("from core.lock import folder_lock\n"
                f"with folder_lock({str(tmp_path / 'f')!r}, wait=0.5): pass\n")
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        assert f"in use by {me['host']} pid {os.getpid()} since {me['since']}" in out.stderr
    with folder_lock(tmp_path / "f", wait=0):  # released: free again
        assert read_owner(tmp_path / "f")["pid"] == os.getpid()
    assert read_owner(tmp_path / "f") is None


def test_lock_is_reentrant_in_one_process_and_waits_for_another(tmp_path):
    with folder_lock(tmp_path, wait=0):
        with folder_lock(tmp_path, wait=0):
            pass
    holder = subprocess.Popen([sys.executable, "-c", "from core.lock import folder_lock\nimport time\n"
                               f"with folder_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(3)\n"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(FolderBusy, match=f"pid {holder.pid}"):
        with folder_lock(tmp_path, wait=0):
            pass
    t0 = time.monotonic()
    with folder_lock(tmp_path, wait=60):  # --wait: blocks until the holder is done
        assert time.monotonic() - t0 > 0.5
    holder.wait(timeout=60)


def test_lock_of_a_killed_run_is_taken_over_with_a_warning(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "from core.lock import folder_lock\nimport time\n"
                               f"with folder_lock({str(tmp_path)!r}, what='medddpm study'):\n"
                               "    print('held', flush=True)\n    time.sleep(600)\n"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=60)
    assert read_owner(tmp_path)["pid"] == holder.pid  # the record outlives a SIGKILL
    with pytest.warns(FolderTakenOver, match=f"medddpm study on .* pid {holder.pid}.*ended without releasing"):
        with folder_lock(tmp_path, wait=0):
            assert read_owner(tmp_path)["pid"] == os.getpid()


def test_cli_train_into_a_held_folder_says_who_holds_it(toy_cohort, tmp_path):
    out = tmp_path / "gen"
    with folder_lock(out, what="medddpm train") as me:
        res = subprocess.run([sys.executable, "-m", "medddpm.cli", "train", "--manifest", str(toy_cohort),
                              "--profile", "tiny", "--out", str(out), "--steps", "2"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1] == (
        f"error: {out} is in use by {me['host']} pid {os.getpid()} since {me['since']}; wait for that run to finish "
        "(--wait SECONDS, or --wait unlimited) or use another folder")
    assert "Traceback" not in res.stderr


# ----------------------------------------------------------------------------------------- segmenters

SEG = {"profile": "tiny", "backend": "monai", "seed": 0, "epochs": 1, "iters_per_epoch": 2, "num_threads": 1}


def test_damaged_segmenter_is_trained_again_with_the_same_bytes(toy_cohort, tmp_path):
    from segment.api import model_damage, train

    model = train(toy_cohort, "train", tmp_path / "seg", SEG)
    weights = model / "model.safetensors"
    good = sha256_file(weights)
    flip_byte(weights)
    assert [p.name for p, _ in model_damage(model)] == ["model.safetensors"]
    train(toy_cohort, "train", model, SEG)
    assert sha256_file(weights) == good and model_damage(model) == []


def test_damaged_training_case_is_named_not_the_model_folder(toy_cohort, tmp_path):
    """Regression (issue 32): damage upstream made segment.api.train say the model folder "holds a different
    training ... delete it", naming the wrong file with advice that deletes good work."""
    import shutil

    from cohort.manifest import load_manifest, resolve
    from segment.api import train

    cohort = tmp_path / "cohort"
    shutil.copytree(toy_cohort.parent, cohort)
    manifest = cohort / "data_manifest.csv"
    model = train(manifest, "train", tmp_path / "seg", SEG)
    image = resolve(manifest, load_manifest(manifest).iloc[0]["t1"])
    flip_byte(image)
    with pytest.raises(InputError, match="training case toy_000: sha256 differs") as e:
        train(manifest, "train", model, SEG)
    assert e.value.path == str(image)


# ----------------------------------------------------------------------------------------- a tiny study

@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")
    with prefect_test_harness(server_startup_timeout=300):
        yield


def _tiny_study(study: Path, cohort: Path) -> dict:
    from flows.study import augment_study

    return augment_study(out=str(study), cohort_manifest=str(cohort), profile="tiny", n_real=3, seeds=[0],
                         mixes=["1:0", "0:1"], medddpm_init="scratch", sampler="ddim", sampling_steps=3,
                         medddpm_config={"steps": 6, "checkpoint_every": 3, "progress": False, "num_threads": 1},
                         segmenter_config={"epochs": 1, "iters_per_epoch": 2, "num_threads": 1}, parallel=1)


def _files(study: Path) -> dict[str, str]:
    return {p.relative_to(study).as_posix(): sha256_file(p) for p in sorted(study.rglob("*"))
            if p.is_file() and ".prefect" not in p.parts and p.suffix != ".png" and p.name not in (
                "report.md", "report.html", "quality_report.csv", "loss_log.csv", "train_log.csv", "model_record.json",
                "study.json")}  # timings (study.json: the wall seconds of the stages that ran again)


def test_damaged_study_rerun_rebuilds_every_artifact_with_the_same_bytes(harness, toy_cohort, tmp_path):
    """The issue's recipe on a tiny study: one byte flipped in the generator, a synthetic image, a synthetic label,
    a cached segmenter's weights, and a manifest row whose recorded sha256 no longer matches its file; a rerun
    rebuilds each (the same bytes), `medddpm verify` lists them before and finds the study intact after."""
    from cohort.manifest import load_manifest, resolve
    from flows.verify import verify_study

    study = tmp_path / "study"
    _tiny_study(study, toy_cohort)
    good, hashes = _files(study), json.loads((study / "study.json").read_text())["hashes"]
    assert verify_study(study).problems == []

    pool = study / "synthetic" / "study-real-masks" / "data_manifest.csv"
    rows = load_manifest(pool)
    damaged = [study / "medddpm" / "generator.safetensors", resolve(pool, rows.iloc[0]["t1"]),
               resolve(pool, rows.iloc[1]["label"]), next((study / "segmenters").glob("*/model.safetensors"))]
    for f in damaged:
        flip_byte(f)
    text = pool.read_text()
    pool.write_text(text.replace(rows.iloc[2]["sha256_t2"], "0" * 64))  # a manifest row that lies about a file
    found = {f.path for f in verify_study(study).problems}
    assert {damaged[0], damaged[1], damaged[2], damaged[3].parent, pool} <= found | {pool}
    assert resolve(pool, rows.iloc[2]["t2"]) in found

    _tiny_study(study, toy_cohort)
    assert _files(study) == good  # every damaged artifact rebuilt with its first bytes; nothing else changed
    assert json.loads((study / "study.json").read_text())["hashes"] == hashes
    assert verify_study(study).problems == []


def test_run_cached_reruns_a_subflow_whose_result_is_damaged_and_names_what_stays_damaged(harness, tmp_path):
    """run_cached on a subflow (as train-segmenters): a damaged cached result reruns it with refresh=True; a task
    that hands back the damaged file again is refused with one line naming the file (not reused downstream)."""
    from prefect import flow, task

    from flows.refs import ref
    from flows.tasks import STUDY_TASK, run_cached, with_study_storage

    calls = tmp_path / "calls.txt"

    @task(name="write-cases", **STUDY_TASK)
    def write_cases(out: str, repair: bool) -> object:
        calls.write_text(calls.read_text() + "x" if calls.exists() else "x")
        folder = Path(out)
        image = folder / "a" / "a_t1.nii.gz"
        if repair or not image.exists():
            image.parent.mkdir(parents=True, exist_ok=True)
            image.write_bytes(b"image")
        manifest = folder / "data_manifest.csv"
        if not manifest.exists():
            manifest.write_text("case_id,cohort,source,split,t1,label,sha256_t1\n"
                                f"a,c,real,train,a/a_t1.nii.gz,a/a_t1.nii.gz,{sha256_file(image)}\n")
        return ref(manifest)

    @flow(name="fan-test")
    def fan(study: str, repair: bool, refresh: bool = False):
        return with_study_storage(write_cases, study).with_options(refresh_cache=refresh)(str(Path(study) / "p"),
                                                                                          repair)

    @flow(name="outer-test")
    def outer(study: str, repair: bool):
        return run_cached(fan, study, study, repair)

    first = outer(str(tmp_path), True)
    flip_byte(tmp_path / "p" / "a" / "a_t1.nii.gz")
    assert outer(str(tmp_path), True) == first and calls.read_text() == "xx"  # cache hit, damaged: run again
    flip_byte(tmp_path / "p" / "a" / "a_t1.nii.gz")
    with pytest.raises(InputError, match="a_t1.nii.gz: sha256 differs.*write-cases|fan-test") as e:
        outer(str(tmp_path), False)  # this "library" resume keeps the damaged file
    assert "\n" not in str(e.value)


def test_cli_study_on_a_held_folder_says_who_holds_it_before_any_work(tmp_path):
    """Issue 32: a second `medddpm study` on a folder in use died with a traceback and a duplicate-case error."""
    study = tmp_path / "study"
    with folder_lock(study, what="medddpm study") as me:
        res = subprocess.run([sys.executable, "-m", "medddpm.cli", "study", "--out", str(study), "--profile", "tiny"],
                             cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert f"{study} is in use by {me['host']} pid {os.getpid()} since {me['since']}" in res.stderr.splitlines()[-1]
    assert not (study / "cohort").exists()  # nothing was started


def test_flows_take_the_folder_lock_themselves(tmp_path):
    """A deployment run calls the flow, not the CLI: augment-study and regenerate-cohort take the study folder's
    lock in their own body, so a run elsewhere holding it stops them before any work."""
    from flows.regenerate import regenerate_cohort
    from flows.study import augment_study

    study = tmp_path / "study"
    holder = subprocess.Popen([sys.executable, "-c", "from core.lock import folder_lock\nimport time\n"
                               f"with folder_lock({str(study)!r}):\n    print('held', flush=True)\n"
                               "    time.sleep(30)\n"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(FolderBusy, match=f"pid {holder.pid}"):
            augment_study.fn(out=str(study), profile="tiny")
        with pytest.raises(FolderBusy, match=f"pid {holder.pid}"):
            regenerate_cohort.fn(study_dir=str(study))
        assert not (study / "cohort").exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)


def test_verify_cli_lists_damage_and_exits_1(tmp_path):
    from cohort.manifest import append_rows, make_row
    from cohort.nifti import write_array
    import numpy as np

    manifest = tmp_path / "cohort" / "data_manifest.csv"
    lab = np.zeros((4, 4, 4), np.uint8)
    lab[1:3, 1:3, 1:3] = 1
    img = write_array(tmp_path / "cohort" / "c" / "c_t1.nii.gz", lab.astype(np.float32), np.eye(4))
    seg = write_array(tmp_path / "cohort" / "c" / "c_seg.nii.gz", lab, np.eye(4))
    append_rows(manifest, [make_row(manifest, case_id="c", cohort="x", source="real", split="train",
                                    images={"t1": img}, label=seg, shape=lab.shape, spacing=(1, 1, 1))])
    flip_byte(img)
    res = subprocess.run([sys.executable, "-m", "medddpm.cli", "verify", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stderr[-2000:]
    assert f"DAMAGED      {img}: sha256 differs" in res.stdout
    assert f"MISSING      {tmp_path / 'study.json'}" in res.stdout


def test_a_resumed_training_says_at_which_step_the_previous_run_stopped(toy_cohort, tmp_path, monkeypatch, capsys):
    import synth.train as train_mod

    real_step = train_mod._optimizer_step

    def dies_at_step_5(run, batches, sched):  # as if the process were killed during step 5
        if run.step == 4:
            raise KeyboardInterrupt
        return real_step(run, batches, sched)

    monkeypatch.setattr(train_mod, "_optimizer_step", dies_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train_medddpm(toy_cohort, "tiny", tmp_path, FAST)
    monkeypatch.setattr(train_mod, "_optimizer_step", real_step)
    capsys.readouterr()
    train_mod.train_medddpm(toy_cohort, "tiny", tmp_path, FAST)
    assert "resuming Med-DDPM training at step 3 of 6" in capsys.readouterr().out

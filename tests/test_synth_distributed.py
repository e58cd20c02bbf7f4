"""Med-DDPM training at scale: cases streamed through DataLoader workers, and several processes
(DistributedDataParallel, gloo on the CPU) sharing each step."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import ConfigError
from synth.checkpoint import GENERATOR_FILE, LOSS_LOG, STATE_FILE, load_generator, load_state
from synth.config import get_config
from synth.data import StepBatchSampler, rank_shard
from synth.network import build_unet
from synth.train import train_medddpm

FAST = {"num_threads": 1, "progress": False}
ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("batch_size, grad_accum, world", [(2, 1, 2), (1, 2, 2), (3, 2, 2), (2, 2, 4), (4, 1, 2)])
def test_ranks_share_each_step_and_together_see_the_single_process_batches(batch_size, grad_accum, world):
    n, steps = 5, 7  # steps cross epoch boundaries (5 cases)
    single = list(StepBatchSampler(n, 3, batch_size, grad_accum, steps))
    assert all(len(b) == batch_size for b in single) and len(single) == steps * grad_accum
    per_rank = [list(StepBatchSampler(n, 3, batch_size, grad_accum, steps, rank=r, world=world))
                for r in range(world)]
    micro, accum = rank_shard(batch_size, grad_accum, world)
    assert micro * accum * world == batch_size * grad_accum and micro <= batch_size
    for s in range(steps):
        step_single = [i for b in single[s * grad_accum:(s + 1) * grad_accum] for i in b]
        step_ranks = [i for r in range(world) for b in per_rank[r][s * accum:(s + 1) * accum] for i in b]
        assert step_ranks == step_single  # rank r holds the r-th share of the step, in order
    # a resumed sampler continues the same sequence
    assert list(StepBatchSampler(n, 3, batch_size, grad_accum, steps, start_step=4)) == single[4 * grad_accum:]
    # every case is seen once per epoch
    flat = [i for b in single for i in b]
    assert sorted(flat[:n]) == list(range(n))


def test_bad_process_counts_are_refused_with_one_clear_error(monkeypatch, capsys, toy_cohort, tmp_path):
    from medddpm.cli import main
    from synth.distributed import check_nproc

    with pytest.raises(ConfigError, match="cannot share an optimizer step of batch_size 1 x grad_accum 2"):
        rank_shard(1, 2, 4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--nproc 3 .* 2 CUDA device\(s\); use --nproc 2 or fewer"):
        check_nproc(3, torch.device("cuda"))
    check_nproc(2, torch.device("cuda"))
    check_nproc(3, torch.device("cpu"))  # CPU processes: any number
    # the CLI refuses before starting torchrun: the tiny profile's step of 2 x 1 samples cannot go to 3 processes
    rc = main(["train", "--manifest", str(toy_cohort), "--profile", "tiny", "--out", str(tmp_path / "x"),
               "--device", "cpu", "--nproc", "3"])
    assert rc == 2 and "3 processes cannot share" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_streamed_cases_with_workers_and_a_partial_cache_train_exactly_like_one_process(toy_cohort, tmp_path):
    import json

    from synth.data import load_items, training_rows
    from synth.quality import intensity_ranges

    base = {**FAST, "steps": 4, "checkpoint_every": 4, "device": "cpu"}
    plain = train_medddpm(toy_cohort, "tiny", tmp_path / "plain", base)
    workers = train_medddpm(toy_cohort, "tiny", tmp_path / "workers", {**base, "data_workers": 2, "cache_rate": 0.5})
    pd.testing.assert_series_equal(pd.read_csv(plain.parent / LOSS_LOG)["loss"],
                                   pd.read_csv(workers.parent / LOSS_LOG)["loss"])
    st_plain, st_workers = load_state(plain.parent / STATE_FILE), load_state(workers.parent / STATE_FILE)
    assert all(torch.equal(st_plain["model"][k], st_workers["model"][k]) for k in st_plain["model"])
    # the gate statistics, read one case at a time, are those of all cases loaded at once
    cfg = get_config("tiny")
    expected = intensity_ranges(load_items(toy_cohort, cfg, training_rows(toy_cohort, cfg)), cfg.modalities)
    assert json.loads((plain.parent / "intensity_ranges.json").read_text()) == json.loads(json.dumps(expected))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, manifest: str, out: str, config: dict) -> None:
    """One rank, as torchrun would start it (spawned by torch.multiprocessing)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    train_medddpm(manifest, "tiny", out, config)


def test_two_ranks_of_batch_one_train_the_weights_of_one_process_of_batch_two(toy_cohort, tmp_path):
    import torch.multiprocessing as mp

    config = {**FAST, "steps": 3, "checkpoint_every": 3, "batch_size": 2, "grad_accum": 1, "device": "cpu"}
    mp.spawn(_rank_main, args=(2, _free_port(), str(toy_cohort), str(tmp_path / "ddp"), config), nprocs=2)
    train_medddpm(toy_cohort, "tiny", tmp_path / "one", config)
    ddp, one = load_state(tmp_path / "ddp" / STATE_FILE), load_state(tmp_path / "one" / STATE_FILE)
    assert ddp["step"] == one["step"] == 3

    torch.manual_seed(0)  # the tiny profile's seed: the initial weights of both runs
    start = build_unet(get_config("tiny")).state_dict()

    def flat(sd):
        return torch.cat([sd[k].double().flatten() for k in sorted(start)])

    # Adam divides by |gradient|: entries whose gradient is ~0 in exact arithmetic (a conv bias before a
    # GroupNorm) take a rounding-sized step of either sign, up to lr. So the check is on the whole weight vector:
    # the two runs differ by well under 1 % of how far training moved the weights (a wrong shard or other noise
    # moves them apart by the order of the movement itself).
    moved = float((flat(one["model"]) - flat(start)).norm())
    assert moved > 1e-2
    for key in ("model", "ema"):
        assert float((flat(ddp[key]) - flat(one[key])).norm()) < 0.01 * moved, key
    # the logged loss is the global batch's (mean over ranks)
    np.testing.assert_allclose(pd.read_csv(tmp_path / "ddp" / LOSS_LOG)["loss"],
                               pd.read_csv(tmp_path / "one" / LOSS_LOG)["loss"], rtol=1e-4)
    # rank 0 wrote the gate statistics of all cases
    assert (tmp_path / "ddp" / "intensity_ranges.json").read_text() == \
        (tmp_path / "one" / "intensity_ranges.json").read_text()


@pytest.mark.slow  # default-suite budget (15 min on 2 cores): CI runs it with -m slow
def test_torchrun_job_with_a_killed_rank_resumes_and_finishes_the_single_process_loss_curve(toy_cohort, tmp_path):
    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medddpm.cli", "train", "--manifest", str(toy_cohort), "--profile", "tiny",
           "--out", str(out), "--steps", "12", "--checkpoint-every", "4", "--threads", "1", "--no-progress",
           "--device", "cpu", "--nproc", "2"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / STATE_FILE
    deadline = time.time() + 240
    while not state.exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert state.exists(), job.stderr.read().decode()[-3000:] if job.poll() is not None else "no checkpoint"
    writer = [p for p in psutil.Process(job.pid).children(recursive=True) if p.environ().get("RANK") == "0"]
    assert len(writer) == 1
    os.kill(writer[0].pid, signal.SIGKILL)  # the rank that writes dies mid-run: torchrun ends the job
    assert job.wait(timeout=120) != 0
    killed_at = load_state(state)["step"]
    assert 4 <= killed_at < 12
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = pd.read_csv(out / LOSS_LOG)
    assert log["step"].tolist() == list(range(1, 13))  # no gap, no duplicate
    assert load_state(state)["step"] == 12 and load_generator(out / GENERATOR_FILE)[2]["step"] == "12"
    # the curve of one uninterrupted process with the same global batch (cheaper than a second torchrun job). Not
    # bit for bit: the all-reduce rounds differently and Adam amplifies that where a gradient is ~0 (see the test
    # above), ~1e-3 after 12 steps; a resume with another noise draw or case order is off by 1e-2 or more.
    ref = train_medddpm(toy_cohort, "tiny", tmp_path / "ref", {**FAST, "steps": 12, "checkpoint_every": 4,
                                                               "device": "cpu"})
    np.testing.assert_allclose(log["loss"], pd.read_csv(ref.parent / LOSS_LOG)["loss"], rtol=3e-3)

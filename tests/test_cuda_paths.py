"""CUDA code paths checked on a CPU machine (issue 35): torch.cuda's queries monkeypatched, a child process's
environment and command, the environment of real Dask worker processes, the DataLoader's start method."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import torch

from core.errors import ConfigError


def fake_gpus(monkeypatch, capabilities: list[tuple[int, int]]):
    """torch.cuda as a machine with these GPUs (compute capabilities) would answer it; current_device() is 0 and
    is_bf16_supported() says True (torch counts emulated bf16 by default), so a caller that asks them is caught."""
    asked = []

    def capability(device=None):
        index = torch.device(device).index if isinstance(device, (str, torch.device)) else device
        asked.append(index)
        return capabilities[index or 0]

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(capabilities))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    return asked


# ---- item 2: --precision auto -------------------------------------------------------------------------------

def test_auto_precision_is_bf16_only_on_the_given_gpu_when_it_has_native_bf16(monkeypatch):
    """cuda:0 an H100 (sm90), cuda:1 a T4 (sm75): auto gives bf16 on cuda:0 and fp32 on cuda:1, whatever
    current_device() and torch's emulation-counting is_bf16_supported() say."""
    from core.device import autocast_dtype

    asked = fake_gpus(monkeypatch, [(9, 0), (7, 5)])
    assert autocast_dtype(torch.device("cuda:1"), "auto") is None
    assert asked == [1]
    assert autocast_dtype(torch.device("cuda:0"), "auto") == torch.bfloat16
    assert autocast_dtype(torch.device("cpu"), "auto") is None
    assert autocast_dtype(torch.device("cuda:1"), "bf16") == torch.bfloat16  # asked for explicitly: as asked


# ---- item 1: the nnU-Net child runs on the GPU asked for ------------------------------------------------------

class _RecordingPopen:
    """subprocess.Popen that records the command and environment and exits 0 without output."""
    calls: list = []

    def __init__(self, cmd, env=None, **kwargs):
        type(self).calls.append((cmd, env))
        self.stdout = iter(())

    def wait(self):
        return 0


@pytest.mark.parametrize("parent_visible, expected", [(None, "1"), ("4,6", "6"), ("GPU-aa,GPU-bb", "GPU-bb")])
def test_nnunet_child_sees_only_the_gpu_asked_for(monkeypatch, tmp_path, parent_visible, expected):
    """nnU-Net's trainer moves itself to cuda:0 whatever device it is given: a child for cuda:1 must see only
    that GPU (CUDA_VISIBLE_DEVICES, counted in this process's own visible list) and be given plain cuda."""
    from segment import nnunet_backend

    fake_gpus(monkeypatch, [(8, 0), (8, 0)])
    if parent_visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", parent_visible)
    _RecordingPopen.calls = []
    monkeypatch.setattr(subprocess, "Popen", _RecordingPopen)
    for step in ("train", "predict"):
        nnunet_backend._run_child(tmp_path, step, [], training=step == "train", n_proc=1, device="cuda:1")
    for cmd, env in _RecordingPopen.calls:
        assert cmd[cmd.index("--device") + 1] == "cuda"
        assert env["CUDA_VISIBLE_DEVICES"] == expected
    # the CPU child is left alone
    _RecordingPopen.calls = []
    nnunet_backend._run_child(tmp_path, "train", [], training=True, n_proc=1, device="cpu")
    cmd, env = _RecordingPopen.calls[0]
    assert cmd[cmd.index("--device") + 1] == "cpu" and env.get("CUDA_VISIBLE_DEVICES") == parent_visible


def test_a_gpu_beyond_the_visible_list_is_a_clear_error(monkeypatch):
    from core.device import child_device

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        child_device(torch.device("cuda:1"))


# ---- items 6 and 13: one GPU per Dask worker ------------------------------------------------------------------

def _visible_gpus() -> str | None:
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_gpus_cluster_pins_each_worker_process_to_its_own_gpu(monkeypatch):
    """--gpus 2 in a process that sees GPUs 5, 7 and 9: the runner's cluster starts 2 worker processes, each
    declaring GPU=1 and seeing only its own GPU, 5 and 7 (before, every worker saw every GPU, and auto/cuda meant the
    first in all of them). Without CUDA_VISIBLE_DEVICES, 0 and 1: the flow run in tests/test_flows.py
    (test_gpu_tasks_never_outnumber_the_gpus_a_dask_cluster_declares)."""
    from distributed import Client

    from flows.runners import GPU_RESOURCE, segmenter_task_runner

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7,9")
    runner = segmenter_task_runner(None, 0, 1, gpus=2)
    assert callable(runner.cluster_class)
    with runner.cluster_class(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=60)
        workers = client.scheduler_info()["workers"]
        seen = client.run(_visible_gpus)
        by_name = {info["name"]: seen[addr] for addr, info in workers.items()}
        assert [by_name[k] for k in sorted(by_name)] == ["5", "7"]
        assert all(info["resources"] == GPU_RESOURCE and info["nthreads"] == 1 for info in workers.values())


def test_more_gpus_than_the_machine_has_is_a_clear_error_before_any_work(monkeypatch, tmp_path):
    from flows.runners import check_gpu_count
    from flows.study import augment_study

    fake_gpus(monkeypatch, [(8, 0)])
    with pytest.raises(ConfigError, match="--gpus 2"):
        augment_study.fn(out=str(tmp_path / "study"), gpus=2)
    assert not (tmp_path / "study").exists()
    check_gpu_count(1)
    check_gpu_count(2, "tcp://head:8786")  # a cluster's workers declare their own GPUs


@pytest.mark.parametrize("device, gpus, expected", [("cuda:1", 2, "cuda"), ("cuda", 2, "cuda"),
                                                    ("cuda:1", 0, "cuda:1"), ("cpu", 2, "cpu"), ("mps", 0, "mps")])
def test_a_segmenter_on_a_gpu_worker_runs_on_the_worker_gpu(monkeypatch, device, gpus, expected):
    """--device cuda:1 --gpus 2: Med-DDPM and synthesis run on cuda:1 in the flow process; each segmenter task runs
    on a worker that sees one GPU, where cuda:1 raised a ConfigError: there it is the worker's own GPU, cuda."""
    from core.device import resolve_device
    from flows.runners import segmenter_runtime

    runtime = segmenter_runtime({"device": device}, gpus)
    assert runtime == {"device": expected}
    assert segmenter_runtime({}, gpus) == {}  # auto stays auto (CUDA when present: the worker's GPU)
    if gpus and expected.startswith("cuda"):
        fake_gpus(monkeypatch, [(8, 0)])  # a GPU worker: one visible GPU
        assert resolve_device(runtime["device"]) == torch.device("cuda:0")


# ---- item 7: the flow process gives GPU memory back after its GPU stages ---------------------------------------

@pytest.mark.parametrize("initialized", [True, False])
def test_flow_process_releases_cached_gpu_memory_after_medddpm_stages(monkeypatch, tmp_path, initialized):
    """Med-DDPM training and synthesis run in the flow process (augment-study's generator and synthetic_pools
    stages); after each stage torch's caching allocator gives its blocks back (empty_cache), also after a failure,
    or a segmenter worker on the same GPU can run out of memory. Nothing happens where CUDA was never used."""
    from flows import study
    from flows.refs import ref

    released, ran = [], []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: released.append(len(ran)))
    made = tmp_path / "made.csv"
    made.write_text("x")
    made = ref(made)

    def run_cached(task_, study_dir, *args, **kwargs):
        ran.append(task_.name)
        return made

    monkeypatch.setattr(study, "run_cached", run_cached)
    monkeypatch.setattr(study.registry, "register", lambda *a, **k: None)
    params = SimpleNamespace(medddpm_checkpoint=None, medddpm_init="scratch", medddpm_config={}, profile="tiny",
                             sampler="ddim", sampling_steps=2)
    pools = [SimpleNamespace(name=n, out_dir=str(tmp_path / n), count=1, seed=0, cohort_id=n) for n in ("a", "b")]
    plan = SimpleNamespace(params=params, needs_generator=True, generator_train_ids=["x"], pools=pools)
    study.generator(tmp_path, plan, made, made)
    study.synthetic_pools(tmp_path, plan, made, made, None)
    assert ran == ["train-medddpm", "synthesize-cohort", "synthesize-cohort"]
    assert released == ([1, 3] if initialized else [])  # once after training, once after both pools

    def out_of_memory(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(study, "run_cached", out_of_memory)
    with pytest.raises(RuntimeError):
        study.generator(tmp_path, plan, made, made)
    assert len(released) == (3 if initialized else 0)


# ---- item 12: DataLoader workers are not forked from the multithreaded flow process ---------------------------

def test_medddpm_data_loader_workers_start_by_a_safe_method(monkeypatch):
    """On CUDA the training reads cases with 4 DataLoader workers by default, inside a Prefect flow or Dask worker
    (many threads): fork could copy a lock another thread holds. Workers start by forkserver (or spawn)."""
    import torch.utils.data as tud

    import synth.train

    made = []

    class RecordingLoader:
        def __init__(self, dataset, **kwargs):
            made.append(kwargs)

        def __iter__(self):
            return iter(())

    monkeypatch.setattr(tud, "DataLoader", RecordingLoader)
    for workers in (2, 0):
        run = SimpleNamespace(cfg=SimpleNamespace(data_workers=workers), device=torch.device("cuda:0"),
                              sampler=None)
        synth.train._batches([], run)
    with_workers, without = made
    assert with_workers["num_workers"] == 2
    assert with_workers["multiprocessing_context"] in ("forkserver", "spawn")
    assert without["num_workers"] == 0 and without.get("multiprocessing_context") is None

    # that the real dataset and collate function work in forkserver workers: tests/test_synth_distributed.py
    # (test_streamed_cases_with_workers_and_a_partial_cache_train_exactly_like_one_process)

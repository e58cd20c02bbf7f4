"""Where augment-study's segmenter trainings run: the task runner (a thread pool sized to keep the cores busy,
a local or remote Dask cluster, one Dask worker per GPU) and how a GPU task asks a Dask worker for its GPU.
Policy only: the flows (flows/study.py) pick a runner here and submit their tasks to it."""
from __future__ import annotations

import math
import os

from prefect.task_runners import ThreadPoolTaskRunner

from core.errors import ConfigError

GPU_RESOURCE = {"GPU": 1}  # what a GPU task asks of a Dask worker (workers declare --resources GPU=1 per GPU)


def gpu_submit(task, *args, resources: dict | None = None):
    """task.submit(*args), asking the Dask scheduler for ``resources`` (e.g. GPU_RESOURCE): a worker runs only as
    many such tasks at once as it declares GPUs, whatever its thread count. Without resources (or on the thread
    pool runner) a plain submit."""
    if not resources:
        return task.submit(*args)
    import dask

    with dask.annotate(resources=resources):
        return task.submit(*args)


def available_cores() -> int:
    """CPU cores this process may run on (a container's or a batch job's share, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def balanced_pool_size(n_jobs: int, cores: int) -> int:
    """Equal, single-threaded jobs at once on ``cores`` cores so that the cores stay busy to the end: the count
    between cores and 2 × cores with the shortest makespan when the running jobs share the cores equally (ties: the
    smaller). 9 trainings on 2 cores: 3 at a time, 4.5 training times, where 2 at a time take 5 (the ninth runs
    alone on one core)."""
    n_jobs, cores = max(1, int(n_jobs)), max(1, int(cores))
    if n_jobs <= cores:
        return n_jobs
    makespan = lambda p: math.ceil(n_jobs / p) * p / cores  # noqa: E731  (rounds × time of one round)
    return min(range(cores, 2 * cores + 1), key=lambda p: (makespan(p), p))


def auto_parallel(jobs: list[dict], cores: int | None = None) -> int:
    """Segmenter trainings at once in the thread pool when ``parallel`` is 0 (the default). Trainings that use one
    torch thread on the CPU (the tiny and demo profiles): balanced_pool_size over the available cores. Otherwise
    (a GPU, nnU-Net, or a profile that uses all of torch's threads): 2."""
    from core.device import resolve_device
    from segment.config import as_config

    cores = cores or available_cores()
    configs = [as_config(dict(j["config"])) for j in jobs]
    # nnU-Net trains in child processes with their own data-augmentation workers: not single-threaded jobs
    one_thread_on_cpu = all(c.backend == "monai" and c.num_threads == 1 and resolve_device(c.device).type == "cpu"
                            for c in configs)
    return balanced_pool_size(len(jobs), cores) if jobs and one_thread_on_cpu else 2


def segmenter_runtime(runtime: dict, gpus: int) -> dict:
    """The runtime settings ({"device": ...}) a segmenter task gets. With gpus each Dask worker sees only its own
    GPU (CUDA_VISIBLE_DEVICES: gpu_cluster here, one ``dask worker`` per GPU on a cluster), so a cuda:N named for the
    flow process, where Med-DDPM and synthesis run, is the worker's plain cuda there (cuda:N would be a ConfigError
    on a worker that sees one GPU)."""
    device = str(runtime.get("device", "auto")).strip().lower()
    if gpus and (device == "cuda" or device.startswith("cuda:")):
        return {**runtime, "device": "cuda"}
    return runtime


def gpu_cluster(n_gpus: int, **cluster_kwargs):
    """A started distributed LocalCluster of one single-threaded worker process per GPU, each declaring
    GPU_RESOURCE and seeing only its own GPU: worker k starts with CUDA_VISIBLE_DEVICES set to this process's cuda:k
    (core.device.visible_gpu), as dask_cuda's LocalCUDACluster pins its workers, without that GPU-only dependency.
    prefect-dask's cluster_class for --gpus."""
    import copy

    from distributed import LocalCluster

    from core.device import visible_gpu

    pins = [visible_gpu(k) for k in range(int(n_gpus))]

    class PinnedLocalCluster(LocalCluster):
        def new_worker_spec(self):  # SpecCluster.scale asks it for each worker it adds
            k = min(set(range(len(pins))) - set(self.worker_spec))
            spec = copy.deepcopy(self.new_spec)
            spec["options"]["env"] = {**spec["options"].get("env", {}), "CUDA_VISIBLE_DEVICES": pins[k]}
            return {k: spec}

    cluster = PinnedLocalCluster(n_workers=0, threads_per_worker=1, processes=True, resources=GPU_RESOURCE,
                                 **cluster_kwargs)
    cluster.scale(len(pins))
    cluster.sync(cluster._correct_state)  # every worker is up before the task runner submits
    return cluster


def check_gpu_count(gpus: int, dask_address: str | None = None) -> None:
    """A clear error for --gpus beyond this machine's CUDA GPUs when the workers are to start here (a worker
    without its GPU would train on the CPU under --device auto); no check for a cluster at dask_address (its workers
    declare their own GPUs) or without CUDA (a CPU test of the fan-out)."""
    import torch

    if gpus and not dask_address and torch.cuda.is_available() and gpus > torch.cuda.device_count():
        raise ConfigError(f"--gpus {gpus} asks for one Dask worker per GPU, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s)")


def segmenter_task_runner(dask_address: str | None, dask_workers: int, parallel: int, gpus: int = 0):
    """Where the segmenter trainings run: threads (default), a local Dask cluster of dask_workers processes, an
    existing cluster at dask_address, or, with gpus > 0, one Dask worker per GPU (gpu_cluster: each pinned to its
    GPU and declaring GPU=1)."""
    if dask_address or dask_workers or gpus:
        from prefect_dask import DaskTaskRunner

        if dask_address:  # an existing cluster (e.g. dask-scheduler on a head node; workers with --resources GPU=1)
            return DaskTaskRunner(address=dask_address)
        if gpus:
            return DaskTaskRunner(cluster_class=gpu_cluster, cluster_kwargs={"n_gpus": int(gpus),
                                                                            "dashboard_address": None})
        # one thread per worker process: each training uses torch's own threads
        return DaskTaskRunner(cluster_kwargs={"n_workers": int(dask_workers), "threads_per_worker": 1,
                                              "processes": True, "dashboard_address": None})
    return ThreadPoolTaskRunner(max_workers=max(1, int(parallel)))

"""Several processes training one Med-DDPM (GPUs of one node, or several nodes): torch.distributed set up from
the environment torchrun gives each process (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT).

`medddpm train --nproc N` runs `torchrun --standalone --nproc_per_node N -m medddpm.cli train ...` (one node);
several nodes run torchrun themselves (README, docs/medddpm.md). Backend: nccl on CUDA, gloo on the CPU.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from core.errors import ConfigError

# Rank 0 reads every case once for the quality-gate statistics before training while the others wait in the
# first collective: allow that on a large cohort (a dead rank is noticed by torchrun, not by this timeout).
GROUP_TIMEOUT = timedelta(hours=2)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def main(self) -> bool:
        """The process that writes (checkpoints, logs, generator, ranges)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def ranks_from_env() -> Ranks:
    """This process's place in a torchrun job; a single process when not launched by torchrun."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", 1))
    return Ranks(rank=int(env.get("RANK", 0)), world=world, local_rank=int(env.get("LOCAL_RANK", 0)),
                 local_world=int(env.get("LOCAL_WORLD_SIZE", world)))


def check_nproc(nproc: int, device: torch.device) -> None:
    """One clear error for a process count the machine cannot run (before any process is started)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, not {nproc}")
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise ConfigError(f"--nproc {nproc} asks for one process per GPU, but this machine has "
                          f"{torch.cuda.device_count()} CUDA device(s); use --nproc {torch.cuda.device_count()} "
                          "or fewer (or --device cpu for CPU processes)")
    if device.type == "mps" and nproc > 1:
        raise ConfigError("--nproc > 1 needs CUDA GPUs or the CPU (torch.distributed has no MPS backend)")


def rank_device(device: torch.device, ranks: Ranks) -> torch.device:
    """Under several processes each CUDA process uses the GPU cuda:LOCAL_RANK."""
    if device.type != "cuda" or not ranks.distributed:
        return device
    if ranks.local_rank >= torch.cuda.device_count():
        raise ConfigError(f"{ranks.local_world} processes on this node but {torch.cuda.device_count()} CUDA "
                          "device(s): use --nproc_per_node (--nproc) no larger than the GPU count")
    return torch.device("cuda", ranks.local_rank)


@contextlib.contextmanager
def process_group(device: torch.device, ranks: Ranks):
    """Join torchrun's process group for the block (nccl on CUDA, gloo on the CPU); nothing for one process."""
    if not ranks.distributed or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=GROUP_TIMEOUT)
    try:
        yield
    finally:
        dist.destroy_process_group()


def mean_over_ranks(value: float, ranks: Ranks, device: torch.device) -> float:
    """The mean of a per-rank number over all ranks (the logged loss of a step is the global batch's)."""
    if not ranks.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # nccl reduces CUDA tensors only
    dist.all_reduce(t)
    return float(t.item()) / ranks.world


def torchrun_command(nproc: int, cli_args: list[str]) -> list[str]:
    """The one-node torchrun command line running `medddpm <cli_args>` in nproc processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "medddpm.cli", *cli_args]


def launch(nproc: int, cli_args: list[str]) -> int:
    """Run `medddpm <cli_args>` under torchrun in nproc processes on this node; its exit status."""
    return subprocess.run(torchrun_command(nproc, cli_args)).returncode

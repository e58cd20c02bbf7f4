"""Where torch work runs: ``--device auto|cpu|cuda|cuda:N|mps`` resolved once, with a clear error when the
machine lacks what was asked for (shared by synth/ and segment/)."""
from __future__ import annotations

import contextlib
import os

from .errors import ConfigError

DEVICE_HELP = "auto (CUDA when present, else CPU) | cpu | cuda | cuda:N | mps"


def resolve_device(name: str | None = "auto"):
    """torch.device for a device name; ConfigError if it is unknown or not available on this machine."""
    import torch

    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("device 'mps' asked for, but this machine has no Apple MPS device; use --device cpu")
        return torch.device("mps")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA GPU on this machine "
                              f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use --device cpu")
        index = 0 if name == "cuda" else name.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
        return torch.device(f"cuda:{int(index)}")
    raise ConfigError(f"unknown device {name!r}; use {DEVICE_HELP}")


def autocast_dtype(device, precision: str = "auto"):
    """The autocast dtype for a device and precision setting, or None for plain fp32.

    auto: bf16 on a CUDA GPU with native bf16 (compute capability 8.0, Ampere, and newer), asked of ``device``
    itself; fp32 elsewhere, on V100/T4 too (torch.cuda.is_bf16_supported() counts emulated bf16 and asks the
    current device; bf16 on a CPU without avx512_bf16 was 29x slower here, docs/decisions/0009); bf16 / fp16:
    asked for explicitly (fp16 needs a GradScaler in training)."""
    import torch

    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0):
            return torch.bfloat16
        return None
    raise ConfigError(f"unknown precision {precision!r}; use auto, fp32, bf16 or fp16")


def visible_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a child process only this process's GPU cuda:``index``: the
    index-th entry of this process's own CUDA_VISIBLE_DEVICES when it has one (its cuda:N counts those), else N."""
    seen = os.environ.get("CUDA_VISIBLE_DEVICES")
    if seen is None:
        return str(index)
    entries = [e.strip() for e in seen.split(",") if e.strip()]
    if index >= len(entries):
        raise ConfigError(f"cuda:{index} asked for, but CUDA_VISIBLE_DEVICES={seen!r} shows {len(entries)} GPU(s)")
    return entries[index]


def child_device(device) -> tuple[str, dict[str, str]]:
    """(the device name to give a child process, the environment it needs) for running it on this process's
    ``device``. A CUDA child sees only that GPU and is given plain "cuda": nnU-Net's trainer moves itself to cuda:0
    whatever it is given, so a child of cuda:N must have cuda:N as its only GPU."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return str(device), {}
    return "cuda", {"CUDA_VISIBLE_DEVICES": visible_gpu(device.index or 0)}


@contextlib.contextmanager
def cuda_cache_released():
    """Run the block, then (also after an error) give torch's cached GPU blocks back to the driver, so that a
    long-lived process (the flow process after Med-DDPM training or synthesis) does not keep a GPU's memory that
    another process (a segmenter worker on the same GPU) needs."""
    try:
        yield
    finally:
        import torch

        if torch.cuda.is_initialized():
            import gc

            gc.collect()  # the finished stage's tensors may sit in reference cycles
            torch.cuda.empty_cache()

"""torch's floating-point and determinism settings, scoped to one call and restored afterwards (these are
process-wide switches; a library call should not leave them changed for its caller).

- ``no_tf32``: float32 matrix products and convolutions in full float32. On Ampere and newer GPUs cuDNN runs
  float32 convolutions in TF32 by default (10-bit mantissa); over a sampling chain of many stochastic steps that
  error compounds, so a seed's sample would drift from the float32 result far more than rounding explains.
- ``deterministic_algorithms``: cuDNN's deterministic algorithms, no cuDNN benchmarking, torch's deterministic
  kernels where it has them (``torch.use_deterministic_algorithms(True, warn_only=True)``: an op without one, such
  as ``upsample_trilinear3d_backward`` on CUDA, warns instead of failing), and the cuBLAS workspace setting that
  deterministic cuBLAS needs (CUBLAS_WORKSPACE_CONFIG, set only where unset; cuBLAS reads it when its first handle
  is made, so it counts when the switch is on from the start of the process's GPU work).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

CUBLAS_WORKSPACE = ":4096:8"  # what torch's reproducibility notes give for deterministic cuBLAS


@contextlib.contextmanager
def no_tf32() -> Iterator[None]:
    """TF32 off for CUDA matrix products and cuDNN convolutions inside the block (no effect on the CPU)."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Deterministic kernels inside the block (module docstring); ``enabled=False``: the settings as they are."""
    import torch

    if not enabled:
        yield
        return
    old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    old_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = old[2], old[3]
        if old_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

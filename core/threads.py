"""Scoped torch thread count, shared by synth/ and segment/ (library code never changes it for good)."""
from __future__ import annotations

import contextlib
import threading

_LOCK = threading.Lock()
_USERS = [0, None]  # [blocks currently inside torch_threads, thread count to restore when the last one leaves]


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Use n intra-op torch threads inside the block only; n None or 0 leaves torch's setting alone.

    torch's thread count is process-wide: with trainings in parallel threads (a Prefect thread pool), the latest
    block entered sets it, and the caller's setting comes back when the last block leaves (prefer processes for
    parallel trainings).
    """
    if not n:
        yield
        return
    import torch

    with _LOCK:
        if _USERS[0] == 0:
            _USERS[1] = torch.get_num_threads()
        _USERS[0] += 1
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        with _LOCK:
            _USERS[0] -= 1
            if _USERS[0] == 0:
                torch.set_num_threads(_USERS[1])

"""The GPU numerics switches (core.determinism), checked on the CPU by reading torch's process-wide flags from
inside the network's forward (the flags are plain settings; their CUDA effect needs no GPU to be switched):
sampling runs with TF32 off, ``--deterministic`` reaches training and sampling, and both are restored after."""
from __future__ import annotations

import os

import pytest
import torch

from synth.config import get_config
from synth.network import build_unet
from synth.schedulers import make_sampler, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the machine is shared


def _flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))


def _computes(inputs) -> bool:
    """Whether a module call computes on real data: not the memory plan's count on fake or meta tensors (the CLI's
    refusal check runs the network that way before the run, outside its determinism scope)."""
    from torch._subclasses.fake_tensor import FakeTensor

    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]  # none: called with keywords only, not judged
    return bool(tensors) and not any(isinstance(t, FakeTensor) or t.is_meta for t in tensors)


class _FlagsSeen:
    """A global forward pre-hook recording the flags every module call on real data runs under."""

    def __enter__(self):
        self.seen = set()
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda _m, _inp: self.seen.add(_flags()) if _computes(_inp) else None)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.fixture
def tf32_on():
    """Both TF32 switches on (cuDNN's is on by default, the matmul one off): a scope that forgot to restore them
    shows. Put back as they were afterwards."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def test_sampling_runs_without_tf32_and_restores_the_callers_settings(tf32_on):
    cfg = get_config("tiny")
    torch.manual_seed(0)
    net = build_unet(cfg)
    cond = torch.zeros((1, cfg.in_channels - cfg.out_channels, 16, 20, 16))
    before = _flags()
    with _FlagsSeen() as hook:
        sample(net, make_sampler("ddim", eta=1.0), cond, cfg.out_channels, 2, [0])
    assert hook.seen and {s[:2] for s in hook.seen} == {(False, False)}  # every module call: TF32 off
    assert _flags() == before and before[:2] == (True, True)  # the caller's settings are back


def test_deterministic_switch_reaches_training_and_synthesis_and_is_undone(toy_cohort, tmp_path):
    from medddpm.cli import main

    before = _flags()
    assert before[2] is False  # torch's default: the switch below is what turns it on
    runs = {}
    for name, flag in (("plain", []), ("deterministic", ["--deterministic"])):
        with _FlagsSeen() as hook:
            assert main(["train", "--manifest", str(toy_cohort), "--profile", "tiny", "--out", str(tmp_path / name),
                         "--steps", "1", "--threads", "1", "--no-progress", *flag]) == 0
        train_seen = hook.seen
        with _FlagsSeen() as hook:
            assert main(["synthesize", "--checkpoint", str(tmp_path / name), "--masks", str(toy_cohort),
                         "--count", "1", "--steps", "2", "--max-retries", "0", "--out", str(tmp_path / f"syn-{name}"),
                         "--threads", "1", "--no-progress", *flag]) == 0
        runs[name] = train_seen, hook.seen
        assert _flags() == before  # restored after each call
    on = (True, True, False, os.environ.get("CUBLAS_WORKSPACE_CONFIG") or ":4096:8")
    for seen in runs["deterministic"]:
        assert seen and {s[2:] for s in seen} == {on}
    for seen in runs["plain"]:
        assert seen and all(s[2] is False for s in seen)

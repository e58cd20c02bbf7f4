"""A tiny teacher and its 1-step student, for the tests of what uses a student (tests/test_distill_flows.py,
tests/test_bench_sampler_table.py): bookkeeping and plumbing, not quality."""
from __future__ import annotations

from pathlib import Path


def tiny_teacher_and_student(root: Path, cohort) -> tuple[Path, Path]:
    """(teacher, student): an untrained tiny generator and its 1-step student after one 2 -> 1 round of 2 steps,
    made by synth.distill like `medddpm distill`."""
    import torch

    from synth.checkpoint import save_generator
    from synth.config import get_config
    from synth.distill import DistillConfig, distill_generator
    from synth.network import build_unet

    cfg = get_config("tiny")
    torch.manual_seed(0)
    teacher = save_generator(root / "teacher" / "generator.safetensors", build_unet(cfg), cfg, 0)
    student = distill_generator(teacher, cohort, root / "student", DistillConfig(
        steps=1, teacher_steps=2, round_steps=2, checkpoint_every=2, num_threads=1, progress=False))
    return teacher, student

"""`medddpm plan` (flows.costs): counted costs per stage (meta device, no real computation)."""
from __future__ import annotations

import pytest

from flows.costs import estimate_study_cost
from medddpm.cli import main
from synth.config import get_config
from synth.costs import sample_step_cost, train_step_cost


def test_paper_brats_memory_falls_with_bf16_and_checkpointing_and_flops_scale_with_the_batch():
    cfg = get_config("paper-brats")
    fp32 = train_step_cost(cfg)
    bf16 = train_step_cost(cfg, half_precision=True)
    ckpt = train_step_cost(cfg, half_precision=True, grad_checkpoint=True)
    assert fp32.peak_bytes > bf16.peak_bytes > ckpt.peak_bytes
    assert fp32.peak_bytes / 2 ** 30 > 40 > ckpt.peak_bytes / 2 ** 30  # the 80 GB-card problem, and its fix
    assert train_step_cost(cfg.replace(grad_accum=4)).flops == pytest.approx(2 * fp32.flops)
    # a forward pass is about a third of forward + backward
    assert 0.25 < sample_step_cost(cfg, batch=2).flops / fp32.flops < 0.45


def test_plan_counts_the_studys_work():
    stages = estimate_study_cost("demo", n_real=8, n_test=12, mixes=["1:0", "0:1", "1:2@edited"],
                                 backends=["monai"], seeds=[0, 1, 2], medddpm_steps=100, sampling_steps=10)
    names = [s.name for s in stages]
    assert names == ["Med-DDPM training", "synthesis", "segmenters (monai)"]
    assert "24 volumes x 10 denoising steps" in stages[1].work  # 8 for 0:1 (real masks) + 16 for 1:2@edited
    assert stages[2].work.startswith("9 runs (3 mixes x 3 seeds)")
    assert all(s.flops > 0 and s.peak_bytes > 0 for s in stages)
    twice = estimate_study_cost("demo", 8, 12, ["1:0", "0:1", "1:2@edited"], ["monai"], [0, 1, 2],
                                medddpm_steps=200, sampling_steps=10)
    assert twice[0].flops == pytest.approx(2 * stages[0].flops)


def test_plan_cli_prints_every_stage(capsys):
    assert main(["plan", "--profile", "demo", "--n-real", "8", "--n-test", "12", "--backends", "monai",
                 "--on", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "CPU-hours" in out and "Med-DDPM training" in out and "segmenters (monai)" in out and "measured" in out


def test_gpu_check_script_runs_its_smoke_mode_on_the_cpu(tmp_path, capsys):
    """bench/gpu_check.py is run by hand on a GPU machine; its code paths run here at a tiny grid on the CPU."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--device", "cpu", "--json", str(tmp_path / "g.json")]) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["what"] for r in rows][:3] == ["train step, fp32 eager", "train step, bf16 autocast",
                                             "train step, bf16 + checkpointing"]
    assert all("seconds" in r and r["seconds"] > 0 for r in rows), rows
    assert "| train step, fp32 eager |" in capsys.readouterr().out

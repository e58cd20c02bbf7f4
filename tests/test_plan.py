"""`medddpm plan` (flows.costs): counted costs per stage (meta device, no real computation)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.costs import estimate_study_cost
from medddpm.cli import main
from synth.config import get_config
from synth.costs import sample_step_cost, train_step_cost

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # default-suite budget (15 min on 2 cores): CI runs it with -m slow
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


GPU_CHECK_REQUIREMENTS = REPO / "bench" / "gpu_check.requirements.txt"


def _requirements() -> list[str]:
    """bench/gpu_check.requirements.txt's requirements (what bench/gpu_check.sh installs on the GPU machine)."""
    return [r for r in (line.split("#")[0].strip() for line in GPU_CHECK_REQUIREMENTS.read_text().splitlines()) if r]


def _with_dependencies(names: list[str]) -> set[str]:
    """Those distributions and everything they need (extras followed), as installed here: a GPU machine's torch."""
    import importlib.metadata as md

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen, todo = set(), [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            needs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for extra in {"", *req.extras}:
            todo += [r for r in map(Requirement, needs) if r.marker is None or r.marker.evaluate({"extra": extra})]
    return seen


def _site_with_only(tmp_path: Path, distributions: set[str]) -> Path:
    """A site folder holding links to the installed files of exactly these distributions (nothing else of this
    environment's site-packages is importable from it)."""
    import importlib.metadata as md

    from packaging.utils import canonicalize_name

    site = tmp_path / "site"
    site.mkdir()
    for dist in md.distributions():
        if canonicalize_name(dist.metadata["Name"]) not in distributions:
            continue
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            source = Path(dist.locate_file(top))
            if source.exists() and not (site / top).exists() and not top.endswith(".pth"):
                (site / top).symlink_to(source)
    return site


def _run_gpu_check(site: Path | None, *args: str, **popen) -> subprocess.Popen:
    """``python -m bench.gpu_check --smoke --device cpu ARGS`` from the repository root; with ``site``, the child
    imports only the standard library, this repository and that folder (python -S: no site-packages)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("OUT", None)
    cmd = [sys.executable, *(["-S"] if site else []), "-m", "bench.gpu_check", "--smoke", "--device", "cpu", *args]
    if site:
        env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    return subprocess.Popen(cmd, cwd=REPO, env=env, text=True, **popen)


def test_gpu_check_runs_with_only_torch_and_what_its_script_installs(tmp_path):
    """bench/gpu_check.sh installs bench/gpu_check.requirements.txt on a machine that has torch; the check's smoke
    mode, run with nothing else importable, measures every row (an import the list misses would turn rows into
    ModuleNotFoundError rows)."""
    site = _site_with_only(tmp_path, _with_dependencies(["torch"]) | {n.split("==")[0] for n in _requirements()})
    proc = _run_gpu_check(site, "--json", str(tmp_path / "g.json"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert [r["what"] for r in rows][:3] == ["train step, fp32 eager", "train step, bf16 autocast",
                                             "train step, bf16 + checkpointing"]
    assert all("seconds" in r and r["seconds"] > 0 for r in rows), rows
    assert "| train step, fp32 eager |" in out


def test_gpu_check_requirements_pin_the_tested_versions():
    """The wheels fetched for the GPU machine are the versions the tests run with (pyproject.toml's pins)."""
    import importlib.metadata as md

    pins = dict(r.split("==") for r in _requirements())
    assert pins and {name: md.version(name) for name in pins} == pins


def test_gpu_check_writes_each_row_as_it_finishes(tmp_path):
    """Killed after its first row (a timeout), the check leaves that row on disk."""
    path = tmp_path / "g.json"
    proc = _run_gpu_check(None, "--json", str(path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    running = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert running, f"no row on disk while the check ran: {proc.stderr.read()[-2000:]}"
    rows = json.loads(path.read_text())["rows"]
    # the first row, written while the other four (seconds each) were still to run
    assert len(rows) < 5 and rows[0]["what"] == "train step, fp32 eager" and rows[0]["seconds"] > 0


def test_gpu_check_skips_a_row_the_plan_says_cannot_fit(monkeypatch):
    """On a CUDA device, a row whose synth.costs estimate exceeds the card's memory (less headroom) is skipped
    with the reason; the device's memory comes from torch.cuda.get_device_properties."""
    from types import SimpleNamespace

    import torch

    from bench import gpu_check

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _d: SimpleNamespace(total_memory=40 * 2 ** 30))
    total = gpu_check.device_memory(torch.device("cuda", 0))
    assert total == 40 * 2 ** 30 and gpu_check.device_memory(torch.device("cpu")) is None
    fp32 = train_step_cost(get_config("paper-brats")).peak_bytes  # ~70 GiB: an 80 GB card's, not a 40 GB one's
    assert "more than this device's 40.0 GiB" in gpu_check.memory_skip_reason(fp32, total)
    assert gpu_check.memory_skip_reason(total - 3 * 2 ** 30, total) is None
    assert gpu_check.memory_skip_reason(fp32, None) is None  # the CPU: nothing skipped for memory

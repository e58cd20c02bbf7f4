"""The paper's size, run: every stage at 192x192x144 (paper-brats) with its time and peak memory beside what
`medddpm plan` predicts, and the reduced-grid measurements the Med-DDPM memory model is checked on.

Each stage runs in its own child process (peak memory is per process tree) under a watchdog: the parent polls the
RSS of the child and its descendants (psutil) and kills the tree when it passes --cap-gib, so a stage that would not
fit is stopped, not the machine, and the row says at what RSS and after how long.

Pipeline stages (--stages; the default runs them all, in this order, in --work):
  phantom          `medddpm build-phantom --full-res` (real atlas anatomy, SIMULATED tumours), then
                   `medddpm export-nnunet` of it: a source folder in a layout import-cohort reads
  import           `medddpm import-cohort --profile paper-brats` of that folder (or of --source, your cases)
  authors          `medddpm import-weights --format authors-brats` of a full-size checkpoint in the authors'
                   format (57.6 M parameters, random weights, written into --work first)
  train            one Med-DDPM optimizer step (forward, loss, backward, Adam) at --grid, --precision,
                   --grad-checkpoint
  sample           one sampling network evaluation (fp32) at --grid, --sample-batch (a 2-step sampler is two)
  distill          one distillation step (synth.distill.distillation_loss with DistillConfig's loss settings: the
                   teacher's two DDIM steps without gradient, the student's forward and backward; Adam; EMA) at
                   --grid, fp32, --grad-checkpoint; not in the default pipeline
  nnunet-plan      our nnU-Net back end (segment.nnunet_backend): export of two imported cases (one to train, one
                   to validate and predict) + nnU-Net's fingerprint, plan and 3d_fullres preprocessing
  nnunet-train     nnU-Net's own trainer with a budget of --nnunet-iters training iterations and one validation
                   iteration (one epoch; nnU-Net's final sliding-window validation skipped), via our back end's
                   child entry point
  nnunet-predict   nnU-Net's predictor on the validation case (sliding window, no test-time mirroring, as
                   `segment-predict` runs outside the paper profile)
  dice             Dice/HD95 (eval.segmentation) of nnU-Net's prediction against the label; of the label itself
                   when there is no prediction (a check of the evaluation's cost: Dice 1)

Memory: on the CPU the peak RSS of the stage's process tree (sampled every 0.2 s); for train, sample and distill the RSS
rise over the step in the child (VmHWM after it minus the RSS before it, networks and optimizer built; glibc's mmap
threshold fixed so freed tensors leave the resident set), beside the plan's model of that rise
(synth.costs.predicted_peak_bytes). On a GPU train/sample report torch.cuda.max_memory_allocated, and the nnU-Net
stages that used the GPU report it beside their RSS. The plan predicts Med-DDPM training and sampling (calibrated,
docs/decisions/0018) and an nnU-Net training iteration (flows.costs.segmenter_step_cost: tensors of an
nnU-Net-like network at 128^3, batch 2, not calibrated); every other stage says "no prediction".

--stages fit: the reduced grids of FIT_GRIDS per profile and checkpointing choice (measured vs predicted); with
--precision bf16 (torch.autocast on the device, as `medddpm train --precision bf16`) paper-brats runs BF16_FIT_GRIDS.

    nice -n 5 .venv/bin/python -m bench.bench_fullsize --device cpu --cap-gib 14 --sample-batch 1 --grad-checkpoint
    .venv/bin/python -m bench.bench_fullsize --device cpu --stages fit
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2 ** 30
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # freed tensors go back to the system: RSS follows live tensors
FIT_GRIDS = {"demo": ("32x32x32", "48x48x48", "64x64x64"),
             "paper-brats": ("32x32x32", "48x48x32", "64x48x48"),
             "authors-brats": ("32x32x32", "48x48x32", "64x48x48")}
# --stages fit --precision bf16: paper-brats at grids where the activations, not Adam's state, hold the peak
# (CPU_BF16_CHECKPOINT_VOXEL_FACTOR was fitted on the last two with checkpointing; without it 128x128x96 needs ~11 GiB)
BF16_FIT_GRIDS = {("paper-brats", True): ("64x64x48", "96x96x64", "128x128x96"),
                  ("paper-brats", False): ("64x64x48", "96x96x64")}


def _grid(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("x"))


def measure(what: str, profile: str, grid: tuple[int, ...], batch: int, precision: str, checkpointing: bool,
            device_name: str) -> dict:
    """One step in this process: what = "train" (optimizer step), "sample" (one network evaluation) or "distill"
    (one distillation step, _distill_step)."""
    import torch

    from synth.config import get_config
    from synth.network import build_unet

    device = torch.device(device_name)
    if what == "distill":
        return _distill_step(get_config(profile).replace(grad_checkpoint=checkpointing), grid, batch, device)
    cfg = get_config(profile).replace(grad_checkpoint=checkpointing and what == "train")
    torch.manual_seed(0)
    net = build_unet(cfg).to(device).train(what == "train")
    x = torch.randn(batch, cfg.in_channels, *grid, device=device)
    t = torch.arange(batch, device=device) * 37 + 5
    amp = precision == "bf16"
    opt = torch.optim.Adam(net.parameters(), lr=1e-5) if what == "train" else None

    def step() -> dict:
        if what == "train":
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                out = net(x, t)
            loss = (out.float() - x[:, :cfg.out_channels]).abs().mean()
            loss.backward()
            opt.step()
            return {"loss": float(loss)}
        with torch.no_grad():
            net(x, t)
        return {}

    return _measured_step(device, step)


def _measured_step(device, step) -> dict:
    """step()'s result with its seconds and the memory it raised above what was held before it: on a GPU
    torch.cuda.max_memory_allocated over memory_allocated, on a CPU the RSS rise (VmHWM after minus RSS before)."""
    import psutil
    import torch

    from bench.harness import own_peak_rss_bytes

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    result = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = own_peak_rss_bytes()
    return {**result, "seconds": time.perf_counter() - t0, "rise_gib": (peak - before) / GIB,
            "before_gib": before / GIB}


def _distill_step(cfg, grid: tuple[int, ...], batch: int, device) -> dict:
    """One step of `medddpm distill`'s round (first round, fp32) in this process: the teacher and the student (the
    teacher's weights) and the student's EMA built, then the step's rise measured by _measured_step: the teacher's two
    DDIM steps, the student's loss (DistillConfig's loss, clamp_aware and SNR floor), backward, Adam, the EMA update.
    Random inputs: memory does not depend on the data."""
    import torch

    from synth.distill import DistillConfig, RoundPlan, distillation_loss, weight_floor
    from synth.network import build_unet
    from synth.schedulers import NoiseSchedule

    dc = DistillConfig(steps=2)
    torch.manual_seed(0)
    teacher = build_unet(cfg.replace(grad_checkpoint=False)).to(device).eval().requires_grad_(False)
    student = build_unet(cfg).to(device).train()
    student.load_state_dict(teacher.state_dict())
    ema = [q.detach().clone() for q in student.parameters()]
    opt = torch.optim.Adam(student.parameters(), lr=1e-5)
    schedule = NoiseSchedule.build(cfg.timesteps, cfg.schedule)
    plan = RoundPlan.build(cfg.timesteps, dc.teacher_steps // 2)
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, cfg.out_channels, *grid, generator=gen) * 2 - 1).to(device)
    cond = (torch.rand(batch, cfg.in_channels - cfg.out_channels, *grid, generator=gen) > 0.5).float().to(device)
    noise = torch.randn(batch, cfg.out_channels, *grid, generator=gen, dtype=torch.float64)
    k = torch.zeros(batch, dtype=torch.long)

    def step() -> dict:
        loss = distillation_loss(student, teacher, x0, cond, k, noise, plan, schedule, cfg.prediction,
                                 weight_floor(dc.snr_weight_floor, cfg.prediction), cfg.channels_last, None, dc.loss,
                                 dc.clamp_aware)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, [q.detach() for q in student.parameters()], 1 - dc.ema_decay)
        return {"loss": float(loss)}

    return _measured_step(device, step)


def predicted_gib(what: str, profile: str, grid: tuple[int, ...], batch: int, precision: str, checkpointing: bool,
                  device_type: str) -> float:
    """The plan's model of the step's rise above what is held before it (the weights):
    synth.costs.predicted_step_rise_bytes (the tracked peak less the weights, at the step's precision, calibrated
    on a CPU)."""
    from synth import costs
    from synth.config import get_config

    if what == "distill":  # flows.costs._distillation_step less what is held before it (the weights and the EMA):
        # the larger of the student's training step and the teacher's evaluation (Adam's state is made in the step)
        cfg = get_config(profile)
        return max(costs.predicted_step_rise_bytes(cfg, train=True, grad_checkpoint=checkpointing,
                                                   device_type=device_type, batch=batch, grid=grid),
                   costs.predicted_step_rise_bytes(cfg, train=False, device_type=device_type, batch=batch,
                                                   grid=grid)) / GIB
    return costs.predicted_step_rise_bytes(get_config(profile), train=what == "train",
                                           half_precision=precision == "bf16", grad_checkpoint=checkpointing,
                                           device_type=device_type, batch=batch, grid=grid) / GIB


def run_child(args: list[str], cap_gib: float, poll: float = 0.2) -> dict:
    """Run `python -m bench.bench_fullsize --child ARGS` (one Med-DDPM step, measure()) under the watchdog."""
    return run_watched(["--child", *args], cap_gib, poll)


def run_watched(args: list[str], cap_gib: float, poll: float = 0.2, env: dict | None = None,
                log_path: Path | None = None) -> dict:
    """Run `python -m bench.bench_fullsize ARGS` and return its last JSON line plus tree_peak_gib (the largest
    summed RSS of the child and its descendants) and wall_seconds; the tree is killed past cap_gib RSS. The
    child's output goes to log_path when given."""
    import psutil

    from bench.harness import _tree_rss

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "bench.bench_fullsize", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **MALLOC_ENV, **(env or {})}, start_new_session=True)
    root, top = psutil.Process(proc.pid), 0
    log = []

    def drain(stream):  # read the child's output as it comes: a full pipe would stall it
        for line in stream:
            log.append(line)

    readers = [threading.Thread(target=drain, args=(s,), daemon=True) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()

    def save_log():
        if log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.write_text("".join(log))

    while proc.poll() is None:
        rss = _tree_rss(root)
        top = max(top, rss)
        if rss > cap_gib * GIB:
            os.killpg(proc.pid, 9)  # the child's own session: it and every process it started, nothing else
            proc.wait()
            save_log()
            return {"error": f"stopped by the watchdog at {rss / GIB:.1f} GiB RSS (cap {cap_gib:g} GiB) after "
                             f"{time.perf_counter() - t0:.0f} s", "killed_at_gib": round(rss / GIB, 2),
                    "tree_peak_gib": round(top / GIB, 2), "wall_seconds": round(time.perf_counter() - t0, 1)}
        time.sleep(poll)
    for r in readers:
        r.join()
    save_log()
    wall = time.perf_counter() - t0
    lines = [ln for ln in log if ln.startswith("{")]
    if proc.returncode or not lines:
        errs = [ln.strip() for ln in log if ln.strip() and not ln.startswith("{")]
        return {"error": (errs or [f"exit {proc.returncode}"])[-1][:300], "tree_peak_gib": round(top / GIB, 2),
                "wall_seconds": round(wall, 1)}
    return {**json.loads(lines[-1]), "tree_peak_gib": round(top / GIB, 2), "wall_seconds": round(wall, 1)}


def row(what, profile, grid, batch, precision, ckpt, device, cap_gib) -> dict:
    """One Med-DDPM step (train, sample or distill) in a watched child, with the plan's prediction of its rise."""
    gtext = "x".join(map(str, grid))
    r = run_child([what, profile, gtext, str(batch), precision, str(int(ckpt)), device], cap_gib)
    pred = predicted_gib(what, profile, grid, batch, precision, ckpt, device.split(":")[0])
    out = {"stage": what, "profile": profile, "grid": gtext, "batch": batch, "precision": precision,
           "checkpointing": ckpt, "predicted_gib": round(pred, 3), **r}
    print(json.dumps(out), flush=True)
    return out


# --- the pipeline stages ---------------------------------------------------------------------------------------

PIPELINE = ("phantom", "import", "authors", "train", "sample", "nnunet-plan", "nnunet-train", "nnunet-predict",
            "dice")
NNUNET_TRAINER = "nnUNetTrainer_fullsize"
# nnU-Net finds trainers by class name in the folders of nnUNet_extTrainer; this one is written into the work folder
# (the bench's budget is not one of segment.config.NNUNET_BUDGETS, whose trainers serve the study)
NNUNET_TRAINER_SOURCE = '''"""Written by bench/bench_fullsize.py: nnU-Net's own trainer with the bench's budget."""
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class {name}(nnUNetTrainer):
    """One epoch of {iters} training iterations and one validation iteration."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = {iters}
        self.num_val_iterations_per_epoch = 1

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Skipped: the bench's nnunet-predict stage measures inference on its own."""
'''


class Work:
    """Where each stage reads and writes inside --work."""

    def __init__(self, root: Path, source: Path | None = None):
        self.root = Path(root)
        self.phantom = self.root / "phantom"                    # build-phantom --full-res
        self.phantom_raw = self.root / "phantom_raw"            # export-nnunet of it: import-cohort's source
        self.source = Path(source) if source else self.phantom_raw / "Dataset500_phantom"
        self.cohort = self.root / "cohort"                      # import-cohort --profile paper-brats
        self.authors_ckpt = self.root / "authors_brats_random.pt"
        self.authors_gen = self.root / "authors_generator"
        self.nnunet = self.root / "nnunet_model"                # segment.nnunet_backend's model_dir layout
        self.trainers = self.root / "nnunet_trainers"
        self.predictions = self.root / "predictions"

    @property
    def manifest(self) -> Path:
        return self.cohort / "data_manifest.csv"

    def case_ids(self) -> tuple[str, str]:
        """(the case nnU-Net trains on, the case it validates on and predicts): the first and last imported."""
        import csv

        with open(self.manifest, newline="") as f:
            ids = [r["case_id"] for r in csv.DictReader(f)]
        return ids[0], ids[-1]


def write_authors_checkpoint(path: Path) -> Path:
    """A checkpoint in the authors' format (synth.authors_weights' docstring) at the published BraTS size, random
    weights: {'step', 'model', 'ema'}, the U-Net under 'denoise_fn.' in their axis order, plus the schedule."""
    import torch

    from core.fsutil import atomic_path
    from synth.authors_weights import PREFIX, kernels_to_our_axes
    from synth.config import get_config
    from synth.network import build_unet
    from synth.schedulers import make_training_scheduler

    cfg = get_config("authors-brats")
    torch.manual_seed(0)
    net = build_unet(cfg)
    sd = {PREFIX + k: v for k, v in kernels_to_our_axes(net.state_dict()).items()}  # reversal = its own inverse
    sched = make_training_scheduler(cfg.timesteps, cfg.schedule)
    sd.update(betas=sched.betas.float(), alphas_cumprod=sched.alphas_cumprod.float())
    with atomic_path(path) as tmp:
        torch.save({"step": 0, "model": sd, "ema": sd}, tmp)
    return path


def nnunet_child_env(work: Work, device: str, *, training: bool) -> dict[str, str]:
    """Our back end's environment for an nnU-Net step (segment.nnunet_backend.nnunet_env), with the bench's
    trainer folder added to nnUNet_extTrainer."""
    from segment.nnunet_backend import nnunet_env

    env = nnunet_env(work.nnunet, training=training, n_proc=2, threads=2, gpu=device.startswith("cuda"))
    env["nnUNet_extTrainer"] += os.pathsep + str(work.trainers)
    return {k: v for k, v in env.items() if os.environ.get(k) != v}


def _gpu_peak(device: str) -> dict:
    import torch

    if device.startswith("cuda") and torch.cuda.is_initialized():
        return {"gpu_peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 3)}
    return {}


def _cli(argv: list[str]) -> None:
    from medddpm.cli import main as cli

    rc = cli(argv)
    if rc:
        raise SystemExit(f"medddpm {argv[0]} exited {rc}")


def run_stage(stage: str, work: Work, device: str, opts: dict) -> dict:
    """One pipeline stage in this (the measured child) process; returns its result fields."""
    import shutil

    t0 = time.perf_counter()
    result: dict = {}
    if stage == "phantom":
        shutil.rmtree(work.phantom, ignore_errors=True)
        shutil.rmtree(work.phantom_raw, ignore_errors=True)
        _cli(["build-phantom", "--full-res", "--cases", str(opts["phantom_cases"]), "--out", str(work.phantom)])
        _cli(["export-nnunet", str(work.phantom / "data_manifest.csv"), "--out", str(work.phantom_raw),
              "--id", "500", "--name", "phantom"])
    elif stage == "import":
        shutil.rmtree(work.cohort, ignore_errors=True)
        _cli(["import-cohort", str(work.source), "--out", str(work.cohort), "--profile", "paper-brats"])
    elif stage == "authors":
        shutil.rmtree(work.authors_gen, ignore_errors=True)
        _cli(["import-weights", str(work.authors_ckpt), "--format", "authors-brats", "--out", str(work.authors_gen)])
    elif stage == "nnunet-plan":
        from cohort.nnunet import export_nnunet
        from segment import nnunet_backend as nb

        shutil.rmtree(work.nnunet, ignore_errors=True)
        train_id, val_id = work.case_ids()
        raw = export_nnunet(work.manifest, nb.roots(work.nnunet)["raw"], nb.DATASET_ID, nb.DATASET_NAME, [train_id],
                            val_ids=[val_id])
        assert nb.main(["plan", "--n-proc", "2"]) == 0
        shutil.copyfile(raw / "splits_final.json",  # as segment.nnunet_backend.train: fold 0 validates on val_id
                        nb.roots(work.nnunet)["preprocessed"] / nb.DATASET / "splits_final.json")
        plans = json.loads((nb.roots(work.nnunet)["preprocessed"] / nb.DATASET / f"{nb.PLANS}.json").read_text())
        conf = plans["configurations"][nb.CONFIGURATION]
        result["nnunet_plan"] = {"patch_size": conf["patch_size"], "batch_size": conf["batch_size"]}
    elif stage == "nnunet-train":
        from segment import nnunet_backend as nb

        shutil.rmtree(nb.trained_model_folder(work.nnunet, NNUNET_TRAINER), ignore_errors=True)
        assert nb.main(["train", "--trainer", NNUNET_TRAINER, "--threads", "2", "--device", device]) == 0
        ckpt = nb.load_checkpoint(nb.final_checkpoint(work.nnunet, NNUNET_TRAINER))
        result["train_losses"] = [round(float(v), 4) for v in ckpt["logging"]["train_losses"]]
    elif stage == "nnunet-predict":
        from cohort.manifest import load_manifest, read_case
        from cohort.nifti import read_label, write_array
        from segment import nnunet_backend as nb

        _, val_id = work.case_ids()
        shutil.rmtree(work.predictions, ignore_errors=True)
        channels = json.loads((nb.roots(work.nnunet)["raw"] / nb.DATASET / "dataset.json").read_text())["channel_names"]
        rows = load_manifest(work.manifest).set_index("case_id", drop=False)
        image = read_case(work.manifest, rows.loc[val_id]).image
        for k in range(len(channels)):  # the input files as segment.nnunet_backend.predict writes them
            write_array(work.predictions / "in" / f"case_00000_{k:04d}.nii.gz", image.channel(channels[str(k)]),
                        image.affine)
        assert nb.main(["predict", "--trainer", NNUNET_TRAINER, "--input", str(work.predictions / "in"),
                        "--output", str(work.predictions / "out"), "--threads", "2", "--no-mirroring",
                        "--device", device]) == 0
        lab, _ = read_label(work.predictions / "out" / "case_00000.nii.gz", allowed=range(4))
        write_array(work.predictions / f"{val_id}.nii.gz", lab, image.affine)
    elif stage == "dice":
        from cohort.manifest import case_files, load_manifest
        from eval.segmentation import evaluate_predictions

        _, val_id = work.case_ids()
        pred = work.predictions / f"{val_id}.nii.gz"
        if not pred.exists():  # no nnU-Net prediction: score the label against itself (the evaluation's cost)
            rows = load_manifest(work.manifest).set_index("case_id", drop=False)
            pred = case_files(work.manifest, rows.loc[val_id]).label
            result["scored"] = "the label itself (no nnU-Net prediction in --work)"
        else:
            result["scored"] = "nnU-Net's prediction"
        scores = evaluate_predictions({val_id: pred}, work.manifest, progress=False)
        result["dice"] = {r["region"]: round(float(r["dice"]), 4) for _, r in scores.iterrows()}
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return {**result, "seconds": time.perf_counter() - t0, **_gpu_peak(device)}


def stage_prediction(stage: str, device: str, opts: dict) -> tuple[float | None, str]:
    """(the plan's predicted peak GiB for a pipeline stage or None, what the prediction is)."""
    if stage == "nnunet-train":
        from cohort.profiles import get_profile
        from flows.costs import segmenter_step_cost

        _, peak, _, what = segmenter_step_cost("nnunet", "paper", get_profile("paper-brats").shape, 4)
        return peak / GIB, f"`medddpm plan`'s segmenter peak: tensors of an {what} (not calibrated, no process)"
    return None, "no prediction"


def pipeline_row(stage: str, work: Work, device: str, cap_gib: float, opts: dict) -> dict:
    if stage == "authors" and not work.authors_ckpt.exists():
        write_authors_checkpoint(work.authors_ckpt)  # in the parent: the row measures the import only
    if stage == "nnunet-train":
        work.trainers.mkdir(parents=True, exist_ok=True)
        (work.trainers / f"{NNUNET_TRAINER}.py").write_text(
            NNUNET_TRAINER_SOURCE.format(name=NNUNET_TRAINER, iters=opts["nnunet_iters"]))
    env = nnunet_child_env(work, device, training=stage == "nnunet-train") if stage.startswith("nnunet") else {}
    spec = {"stage": stage, "work": str(work.root), "source": str(work.source), "device": device, "opts": opts}
    r = run_watched(["--child-stage", json.dumps(spec)], cap_gib, env=env,
                    log_path=work.root / "logs" / f"{stage}.log")
    pred, note = stage_prediction(stage, device, opts)
    out = {"stage": stage, "device": device, "peak_gib": r.get("tree_peak_gib"),
           "predicted_gib": None if pred is None else round(pred, 3), "prediction": note, **r}
    print(json.dumps(out), flush=True)
    return out


def _fmt_row(r: dict) -> str:
    """One line of the pipeline table (the Med-DDPM steps have their own table)."""
    peak = r.get("peak_gib")
    extra = {k: r[k] for k in ("nnunet_plan", "train_losses", "dice", "scored", "gpu_peak_gib") if k in r}
    what = "; ".join(f"{k} {v}" for k, v in extra.items())
    pred = r.get("predicted_gib")
    if "error" in r:
        return (f"| {r['stage']} | {r['error']} | | {pred if pred is not None else 'no prediction'} | | "
                f"{what} |")
    ratio = f"{pred / peak:.2f}" if pred is not None and peak else ""
    return (f"| {r['stage']} | {r['seconds']:.1f} | {peak:.2f} | "
            f"{f'{pred:.2f}' if pred is not None else 'no prediction'} | {ratio} | {what} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", nargs="+", default=list(PIPELINE), choices=(*PIPELINE, "fit", "distill"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/medddpm-bench-fullsize"),
                    help="folder for the stages' files (each stage replaces its own outputs)")
    ap.add_argument("--source", type=Path, help="import these cases (any import-cohort layout) instead of the phantom")
    ap.add_argument("--phantom-cases", type=int, default=2,
                    help="at least 2: nnU-Net trains on one case and validates on another")
    ap.add_argument("--nnunet-iters", type=int, default=2, help="nnU-Net training iterations")
    ap.add_argument("--profile", default="paper-brats")
    ap.add_argument("--grid", default="192x192x144")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--grad-checkpoint", action="store_true")
    ap.add_argument("--sample-batch", type=int, help="volumes per network evaluation (default synthesize's)")
    ap.add_argument("--fit-profiles", nargs="+", default=["demo", "paper-brats"])
    ap.add_argument("--cap-gib", type=float, default=6.0, help="watchdog: kill a child's tree past this RSS")
    ap.add_argument("--json", help="write the rows here as JSON lines")
    ap.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    ap.add_argument("--child-stage", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        what, profile, grid, batch, precision, ckpt, device = a.child
        print(json.dumps(measure(what, profile, _grid(grid), int(batch), precision, ckpt == "1", device)))
        return 0
    if a.child_stage:
        spec = json.loads(a.child_stage)
        work = Work(Path(spec["work"]), Path(spec["source"]))
        print(json.dumps(run_stage(spec["stage"], work, spec["device"], spec["opts"])))
        return 0
    if a.phantom_cases < 2:
        ap.error("--phantom-cases must be at least 2 (nnU-Net trains on one case and validates on another)")
    from synth import defaults
    from synth.config import get_config

    work = Work(a.work, a.source)
    work.root.mkdir(parents=True, exist_ok=True)
    opts = {"phantom_cases": a.phantom_cases, "nnunet_iters": a.nnunet_iters}
    rows, step_rows = [], []
    for stage in a.stages:
        if stage == "fit":
            for profile in a.fit_profiles:
                batch = get_config(profile).batch_size
                for ckpt in (False, True):
                    grids = FIT_GRIDS[profile]
                    if a.precision == "bf16":
                        grids = BF16_FIT_GRIDS.get((profile, ckpt), grids)
                    for grid in grids:
                        step_rows.append(row("train", profile, _grid(grid), batch, a.precision, ckpt, a.device,
                                             a.cap_gib))
        elif stage == "train":
            step_rows.append(row("train", a.profile, _grid(a.grid), get_config(a.profile).batch_size, a.precision,
                                 a.grad_checkpoint, a.device, a.cap_gib))
        elif stage == "distill":
            step_rows.append(row("distill", a.profile, _grid(a.grid), get_config(a.profile).batch_size, "fp32",
                                 a.grad_checkpoint, a.device, a.cap_gib))
        elif stage == "sample":
            step_rows.append(row("sample", a.profile, _grid(a.grid), a.sample_batch or defaults.BATCH_SIZE, "fp32",
                                 False, a.device, a.cap_gib))
        elif stage == "phantom" and a.source:
            continue  # the user's cases replace the phantom
        else:
            rows.append(pipeline_row(stage, work, a.device, a.cap_gib, opts))
        if a.json:
            Path(a.json).write_text("".join(json.dumps(r) + "\n" for r in rows + step_rows))
    if rows:
        print(f"\n| stage | seconds | peak GiB ({'RSS' if a.device == 'cpu' else 'RSS; GPU in notes'}) | plan GiB | "
              "plan / measured | notes |\n|---|---|---|---|---|---|")
        for r in rows:
            print(_fmt_row(r))
    if step_rows:
        print("\n| stage | profile | grid | batch | precision | checkpointing | seconds | peak GiB (step) | "
              "plan GiB | plan / measured |\n|---|---|---|---|---|---|---|---|---|---|")
        for r in step_rows:
            if "error" in r:
                print(f"| {r['stage']} | {r['profile']} | {r['grid']} | {r['batch']} | {r['precision']} | "
                      f"{r['checkpointing']} | {r['error']} | | {r['predicted_gib']:.2f} | |")
            else:
                print(f"| {r['stage']} | {r['profile']} | {r['grid']} | {r['batch']} | {r['precision']} | "
                      f"{r['checkpointing']} | {r['seconds']:.1f} | {r['rise_gib']:.2f} | "
                      f"{r['predicted_gib']:.2f} | {r['predicted_gib'] / r['rise_gib']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

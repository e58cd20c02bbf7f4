"""nnU-Net v2 back end: export (cohort.nnunet) -> plan + preprocess -> train -> predict, all inside model_dir.

nnU-Net's own steps run in a child process (``python -m segment.nnunet_backend plan|train|predict``): its
fingerprinting, preprocessing and validation export use spawn pools, which hang unless the entry module has a
``__main__`` guard. A child with its own guard works the same from a script, pytest or a Prefect/Dask task, and
gets nnU-Net's environment (nnUNet_raw/preprocessed/results inside model_dir, worker counts) without touching
the caller's. The training budget is a trainer class (segment/nnunet_trainers/, found via nnUNet_extTrainer).

model_dir/
  config.json, training_data.json, train_log.csv, model.safetensors, training_summary.json   (as MONAI)
  nnunet/raw/Dataset001_segment/        the export (splits_final.json: validation holds real cases only)
  nnunet/preprocessed/, nnunet/results/  nnU-Net's own folders (results/... /fold_0/checkpoint_final.pth)
  nnunet/logs/<step>.log                 nnU-Net's console output per step

Fine-tuning (cfg.init_from: a finished nnU-Net segmenter's model.safetensors) follows nnU-Net's pre-training recipe:
the pretrained model's plans are copied in as dataset PRETRAINED_DATASET and moved onto this dataset with nnU-Net's
move_plans_between_datasets (instead of planning anew, so the network is the pretrained one), this dataset is
preprocessed with them, and training starts from the weights (run_training's pretrained_weights, which nnU-Net
loads into every layer but the segmentation heads). The weights file given to nnU-Net is
nnunet/pretrained_weights.pth, written from init_from (whose sha256 the config holds).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from core.device import child_device, resolve_device
from core.errors import InputError
from core.fsutil import atomic_path, atomic_write_text

from .config import SegmenterConfig, load_config

DATASET_ID, DATASET_NAME = 1, "segment"
DATASET = f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
CONFIGURATION, FOLD, PLANS = "3d_fullres", 0, "nnUNetPlans"
# the pretrained model's plans, beside this dataset in nnunet/preprocessed/, as move_plans_between_datasets reads them.
# They keep the plans identifier nnUNetPlans on this dataset: a fine-tuning never plans its dataset itself, so
# nothing of its own is overwritten, and the trained folder is where predict looks (trained_model_folder)
PRETRAINED_ID = 2
PRETRAINED_DATASET = f"Dataset{PRETRAINED_ID:03d}_pretrained"
TRAINER_DIR = Path(__file__).resolve().parent / "nnunet_trainers"
_PROJECT_ROOT = Path(__file__).resolve().parent.parent


def roots(model_dir: Path) -> dict[str, Path]:
    base = Path(model_dir).resolve() / "nnunet"
    return {"raw": base / "raw", "preprocessed": base / "preprocessed", "results": base / "results", "base": base}


def trained_model_folder(model_dir: Path, trainer: str) -> Path:
    return roots(model_dir)["results"] / DATASET / f"{trainer}__{PLANS}__{CONFIGURATION}"


def nnunet_env(model_dir: Path, *, training: bool, n_proc: int = 2, threads: int | None = None,
               gpu: bool = False) -> dict[str, str]:
    """Environment for one nnU-Net child process (the caller's os.environ is not changed).

    On a GPU nnU-Net keeps its own behaviour: torch.compile (nnUNet_compile) and its data-augmentation worker
    processes (nnUNet_n_proc_DA), unless the user set those variables. On the CPU compile is off and data
    augmentation runs in the training process (fastest on 2 cores)."""
    r = roots(model_dir)
    env = dict(os.environ)
    if threads:  # set before the child's OpenMP starts; PASSIVE: no spin-waiting when cores are shared
        env.update(OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    env.update(nnUNet_raw=str(r["raw"]), nnUNet_preprocessed=str(r["preprocessed"]), nnUNet_results=str(r["results"]),
               nnUNet_extTrainer=str(TRAINER_DIR), nnUNet_def_n_proc=str(n_proc), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(_PROJECT_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p]))
    # 0 = data augmentation in the training process (no worker processes: fastest on 2 cores). It must not be 0
    # during planning, where nnU-Net calls torch.set_num_threads(nnUNet_n_proc_DA).
    if not gpu:
        env["nnUNet_compile"] = "false"
    if training and not gpu:
        env["nnUNet_n_proc_DA"] = "0"
    elif not training:
        env.pop("nnUNet_n_proc_DA", None)
    return env


def _workers(cfg: SegmenterConfig) -> tuple[int, int]:
    """(worker processes for nnU-Net's planning/preprocessing/export, torch threads of a child): at most 2 workers."""
    n_proc = max(1, min(2, os.cpu_count() or 1))
    return n_proc, cfg.num_threads or n_proc


def _run_child(model_dir: Path, step: str, args: list[str], *, training: bool, n_proc: int,
               threads: int | None = None, epochs: int | None = None, device: str = "cpu") -> None:
    """Run ``python -m segment.nnunet_backend <step> ...``; stream its output to nnunet/logs/<step>.log.

    During training, nnU-Net's "Epoch N" lines advance a tqdm bar. On cuda:N the child sees only GPU N and is
    given plain cuda (core.device.child_device): nnU-Net's trainer would train on cuda:0 whatever it is given.
    """
    log_dir = roots(model_dir)["base"] / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{step}.log"
    cmd = [sys.executable, "-m", "segment.nnunet_backend", step, *args]
    child, device_env = child_device(device)
    if step != "plan":
        cmd += ["--device", child]
    bar = tqdm(total=epochs, desc=f"segment[nnunet] {step}", unit="epoch" if epochs else "it", leave=False)
    tail: list[str] = []
    with open(log_path, "a", buffering=1) as log:  # line-buffered: the log is readable while nnU-Net runs
        log.write(f"$ {' '.join([*(f'{k}={v}' for k, v in device_env.items()), *cmd])}\n")
        env = {**nnunet_env(model_dir, training=training, n_proc=n_proc, threads=threads, gpu=child == "cuda"),
               **device_env}
        proc = subprocess.Popen(cmd, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=str(model_dir))
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            tail = (tail + [line.rstrip()])[-15:]
            m = re.search(r"Epoch (\d+)\s*$", line)
            if m and epochs:
                bar.n = int(m.group(1))
                bar.refresh()
        rc = proc.wait()
    bar.close()
    if rc != 0:
        raise InputError(log_path, f"nnU-Net {step} failed (exit code {rc}); last output:\n" + "\n".join(tail),
                          kind="nnunet-failed")


def final_checkpoint(model_dir: Path, trainer: str) -> Path:
    """nnU-Net's checkpoint_final.pth of fold 0: what its predictor loads."""
    return trained_model_folder(model_dir, trainer) / f"fold_{FOLD}" / "checkpoint_final.pth"


def load_checkpoint(path: Path) -> dict:
    """An nnU-Net checkpoint, loaded weights_only (its log holds numpy scalars: exactly those are allowed too)."""
    import torch

    safe = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(path, f"cannot read nnU-Net's checkpoint ({e})", kind="unreadable") from e


def _write_log_and_weights(model_dir: Path, cfg: SegmenterConfig) -> dict:
    """train_log.csv and model.safetensors from nnU-Net's final checkpoint (loaded weights_only)."""
    from safetensors.torch import save_file

    ckpt_path = final_checkpoint(model_dir, cfg.trainer)
    ckpt = load_checkpoint(ckpt_path)
    lg = ckpt.get("logging", {})
    n = len(lg.get("train_losses", []))
    col = lambda k, i: lg.get(k, [])[i] if i < len(lg.get(k, [])) else float("nan")  # noqa: E731
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["epoch", "train_loss", "val_dice", "lr", "seconds", "val_loss", "ema_val_dice"])
    for i in range(n):
        secs = col("epoch_end_timestamps", i) - col("epoch_start_timestamps", i)
        w.writerow([i, f"{col('train_losses', i):.5f}", f"{col('mean_fg_dice', i):.4f}", f"{col('lrs', i):.3g}",
                    f"{secs:.2f}", f"{col('val_losses', i):.5f}", f"{col('ema_fg_dice', i):.4f}"])
    atomic_write_text(model_dir / "train_log.csv", buf.getvalue())
    with atomic_path(model_dir / "model.safetensors") as tmp:
        # clone: nnU-Net aliases some tensors
        save_file({k: v.clone().contiguous() for k, v in ckpt["network_weights"].items()}, str(tmp))
    summary = {"epochs_run": n, "final_ema_val_dice": float(lg["ema_fg_dice"][-1]) if lg.get("ema_fg_dice") else None}
    val_summary = ckpt_path.parent / "validation" / "summary.json"
    if val_summary.exists():
        summary["nnunet_validation_foreground_mean_dice"] = float(
            json.loads(val_summary.read_text())["foreground_mean"]["Dice"])
    return summary


def train(manifest: Path, train_ids: list[str], val_ids: list[str], model_dir: Path, cfg: SegmenterConfig) -> Path:
    from cohort.nnunet import export_nnunet

    r = roots(model_dir)
    n_proc, threads = _workers(cfg)
    raw_ds = r["raw"] / DATASET
    if not (raw_ds / "dataset.json").exists():
        export_nnunet(manifest, r["raw"], DATASET_ID, DATASET_NAME, train_ids, modalities=cfg.modalities,
                      val_ids=val_ids or None, split_seed=cfg.seed)
    pre_done = r["preprocessed"] / DATASET / ".medddpm_preprocessed"
    if not pre_done.exists():
        plan_args = ["--n-proc", str(n_proc)]
        if cfg.init_from is not None:
            _stage_pretrained_plans(model_dir, Path(cfg.init_from).parent)
            plan_args.append("--transfer-plans")
        _run_child(model_dir, "plan", plan_args, training=False, n_proc=n_proc, threads=1)
        atomic_write_text(pre_done, "ok\n")
    # the planner copies splits_final.json from raw; make sure fold 0 is ours (validation real-only)
    shutil.copyfile(raw_ds / "splits_final.json", r["preprocessed"] / DATASET / "splits_final.json")

    fold_dir = final_checkpoint(model_dir, cfg.trainer).parent
    if not (fold_dir / "checkpoint_final.pth").exists():
        args = ["--trainer", cfg.trainer, "--threads", str(threads)]
        if (fold_dir / "checkpoint_latest.pth").exists():
            args.append("--continue")  # resume after a kill: nnU-Net continues from its latest checkpoint
        elif cfg.init_from is not None:  # nnU-Net loads pretrained weights only at the start of a training
            args += ["--pretrained-weights", str(_pretrained_weights(model_dir, Path(cfg.init_from)))]
        _run_child(model_dir, "train", args, training=True, n_proc=n_proc, threads=threads, epochs=cfg.epochs,
                   device=str(resolve_device(cfg.device)))
    summary = _write_log_and_weights(model_dir, cfg)
    summary.update(n_train=len(train_ids), n_val=len(val_ids), trainer=cfg.trainer)
    atomic_write_text(model_dir / "training_summary.json", json.dumps(summary, indent=2))
    return model_dir


def _stage_pretrained_plans(model_dir: Path, pretrained_dir: Path) -> Path:
    """The pretrained model's nnUNetPlans.json as dataset PRETRAINED_DATASET of this model's preprocessed folder
    (where move_plans_between_datasets looks for the source plans)."""
    src = roots(pretrained_dir)["preprocessed"] / DATASET / f"{PLANS}.json"
    if not src.exists():
        raise InputError(src, "missing: the pretrained nnU-Net model's plans, needed to fine-tune from it; train "
                              "the pre-training run again", kind="missing-file")
    dst = roots(model_dir)["preprocessed"] / PRETRAINED_DATASET / f"{PLANS}.json"
    dst.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


def _pretrained_weights(model_dir: Path, weights: Path) -> Path:
    """init_from's weights as the checkpoint file nnU-Net's load_pretrained_weights reads ({"network_weights"})."""
    from safetensors.torch import load_file

    from core.fsutil import atomic_torch_save

    out = roots(model_dir)["base"] / "pretrained_weights.pth"
    atomic_torch_save({"network_weights": load_file(str(weights))}, out)
    return out


def predict(model_dir: Path, manifest: Path, case_ids: list[str], out_dir: Path, device: str | None = None
            ) -> dict[str, Path]:
    """Predict with nnU-Net's predictor; outputs re-read and rewritten on the input grid in our convention.
    device: where to run (default: the config's device setting, auto = CUDA when present)."""
    from cohort.manifest import load_manifest, read_case
    from cohort.nifti import read_label, write_array
    from cohort.volume import select_channels

    cfg = load_config(model_dir)
    raw_ds = roots(model_dir)["raw"] / DATASET
    channels = json.loads((raw_ds / "dataset.json").read_text())["channel_names"]
    modalities = [channels[str(k)] for k in range(len(channels))]
    rows = load_manifest(manifest).set_index("case_id", drop=False)
    n_proc, threads = _workers(cfg)
    work = Path(tempfile.mkdtemp(prefix=".nnunet-predict-", dir=out_dir))
    try:
        inputs: dict[str, tuple[str, np.ndarray, tuple]] = {}
        for i, cid in enumerate(case_ids):
            image = select_channels(read_case(manifest, rows.loc[cid]).image, modalities, manifest,
                                    f"the model (modalities {modalities})", case_id=cid)
            name = f"case_{i:05d}"  # our own names: manifest ids need not be file-name safe
            for k, m in enumerate(modalities):
                write_array(work / "in" / f"{name}_{k:04d}.nii.gz", image.channel(m), image.affine)
            inputs[cid] = (name, image.affine, image.shape)
        args = ["--trainer", cfg.trainer, "--input", str(work / "in"), "--output", str(work / "out"),
                "--threads", str(threads)]
        if cfg.profile != "paper":
            args.append("--no-mirroring")  # test-time mirroring costs 8x on CPU; kept for the paper profile
        _run_child(model_dir, "predict", args, training=False, n_proc=n_proc, threads=threads,
                   device=str(resolve_device(device or cfg.device)))
        out: dict[str, Path] = {}
        for cid, (name, affine, shape) in inputs.items():
            src = work / "out" / f"{name}.nii.gz"
            lab, _ = read_label(src, allowed=range(4))
            if lab.shape != tuple(shape):
                raise InputError(src, f"nnU-Net prediction shape {lab.shape} differs from the input {shape}",
                                  kind="shape-mismatch")
            out[cid] = write_array(out_dir / f"{cid}.nii.gz", lab, affine)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- child-process entry points (run with the environment from nnunet_env) ----

def _child_plan(a) -> None:
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                      preprocess)

    extract_fingerprints([DATASET_ID], num_processes=a.n_proc, check_dataset_integrity=True)
    if a.transfer_plans:  # nnU-Net's plan transfer (nnUNetv2_move_plans_between_datasets); the planner that it
        # replaces also puts dataset.json beside the plans, where the trainer reads it
        from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
            move_plans_between_datasets)

        move_plans_between_datasets(PRETRAINED_ID, DATASET_ID, PLANS, PLANS)
        shutil.copyfile(Path(os.environ["nnUNet_raw"]) / DATASET / "dataset.json",
                        Path(os.environ["nnUNet_preprocessed"]) / DATASET / "dataset.json")
    else:
        plan_experiments([DATASET_ID])
    preprocess([DATASET_ID], configurations=(CONFIGURATION,), num_processes=(a.n_proc,))


def _child_train(a) -> None:
    import torch
    from nnunetv2.run.run_training import run_training

    torch.set_num_threads(a.threads)
    run_training(DATASET, CONFIGURATION, FOLD, trainer_class_name=a.trainer, continue_training=a.continue_,
                 pretrained_weights=a.pretrained_weights, device=torch.device(a.device))


def _child_predict(a) -> None:
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=not a.no_mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                allow_tqdm=False)
    folder = Path(os.environ["nnUNet_results"]) / DATASET / f"{a.trainer}__{PLANS}__{CONFIGURATION}"
    predictor.initialize_from_trained_model_folder(str(folder), use_folds=(FOLD,))
    Path(a.output).mkdir(parents=True, exist_ok=True)
    predictor.predict_from_files_sequential(a.input, a.output, save_probabilities=False, overwrite=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m segment.nnunet_backend",
                                description="nnU-Net steps in a child process (called by segment.nnunet_backend)")
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("plan")
    s.add_argument("--n-proc", type=int, default=2)
    s.add_argument("--transfer-plans", action="store_true",
                   help=f"take the plans of {PRETRAINED_DATASET} (fine-tuning) instead of planning")
    s.set_defaults(func=_child_plan)
    s = sub.add_parser("train")
    s.add_argument("--trainer", required=True)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--continue", dest="continue_", action="store_true")
    s.add_argument("--pretrained-weights", default=None, help="checkpoint whose network_weights training starts from")
    s.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps")
    s.set_defaults(func=_child_train)
    s = sub.add_parser("predict")
    s.add_argument("--trainer", required=True)
    s.add_argument("--input", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--no-mirroring", action="store_true")
    s.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N, mps")
    s.set_defaults(func=_child_predict)
    a = p.parse_args(argv)
    a.func(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())

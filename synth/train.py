"""Med-DDPM training: ε-prediction (v-prediction at demo) with L1 (or L2) loss on the cosine schedule, Adam,
gradient accumulation, EMA, atomic resumable checkpoints and a loss log.

Every random draw (timesteps, noise) comes from one torch.Generator whose state is checkpointed, and the data
order is a function of (seed, epoch), so a run killed with SIGKILL and restarted continues the same loss curve
(tested on the CPU). On a GPU that holds only with config.deterministic (``--deterministic``): cuDNN's weight
gradients and some backward kernels otherwise add in a varying order, and the curves part by growing rounding.
Cases stream through a DataLoader (synth.data.StepBatchSampler); under torchrun each process takes its share of
every step's samples and DistributedDataParallel averages the gradients (synth.distributed).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from core.determinism import deterministic_algorithms
from core.device import autocast_dtype, resolve_device
from core.errors import InputError, ConfigError
from core.fsutil import atomic_path, atomic_write_csv, atomic_write_text, read_csv_log, sha256_bytes, sha256_file
from cohort.manifest import FILE_COLUMNS
from cohort.profiles import get_profile
from core.threads import torch_threads

from .checkpoint import (CONFIG_FILE, GENERATOR_FILE, LOSS_LOG, RANGES_FILE, STATE_FILE, adopt_init_network,
                         init_weights, load_state, save_generator, with_init_sha256)
from .config import MedDDPMConfig, get_config
from .data import StepBatchSampler, case_loader, collate_pair, rank_shard, training_dataset, training_rows
from .distributed import Ranks, mean_over_ranks, process_group, rank_device, ranks_from_env
from .network import build_unet
from .preview import PreviewConfig, Previews
from .quality import GATE_FORMAT, intensity_ranges, save_ranges
from .schedulers import make_training_scheduler, model_input

LOG_FIELDS = ("step", "loss", "lr", "seconds")
# The training record: the sha256 of the generator, the resumable state and the intensity ranges as written, so a
# resume reuses none of them damaged. The state's entry lists the hashes a kill may leave on disk (the old and the
# new state while the new one is renamed into place), so an interrupted checkpoint is never taken for damage.
RECORD_FILE = "checkpoints/record.json"


def lr_at(config: MedDDPMConfig, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based). Stateless, so resuming needs no scheduler state.

    A linear warm-up over `warmup_steps` (either schedule), then constant, or cosine decay to lr_min at `steps`
    (the horizon: a resume refuses another --steps with the cosine schedule, see train_medddpm)."""
    base = config.lr
    if config.warmup_steps and step < config.warmup_steps:
        return base * (step + 1) / config.warmup_steps
    if config.lr_schedule == "cosine":
        span = max(1, config.steps - config.warmup_steps)
        p = min(1.0, (step - config.warmup_steps) / span)
        return config.lr_min + 0.5 * (base - config.lr_min) * (1 + math.cos(math.pi * p))
    return base


def min_snr_weights(alphas_cumprod: torch.Tensor, t: torch.Tensor, gamma: float | None, prediction: str,
                    loss: str, floor: float | None = None) -> torch.Tensor:
    """Per-sample Min-SNR-γ weights (Hang et al. 2023) for timesteps ``t``: with them the loss counts the error of
    x̂0 at timestep t as min(SNR_t, γ) (SNR = ᾱ/(1−ᾱ)) with l2, and as its square root with l1 (an l1 error of x̂0
    enters an ε- or v-loss scaled by the square root of the l2 factor). ε-prediction: min(SNR, γ)/SNR; v: min(SNR,
    γ)/(SNR+1); l1 takes their square roots. ``floor``: the x̂0 weight is max(min(SNR, γ), floor) (floor 1 without
    γ: Salimans & Ho 2022's truncated-SNR weighting); γ None: no cap."""
    a = alphas_cumprod.to(t.device, torch.float64)[t]
    snr = a / (1 - a)
    w = snr.clamp(min=floor, max=gamma) / (snr if prediction == "epsilon" else snr + 1)
    return (w.sqrt() if loss == "l1" else w).float()


def diffusion_loss(model, x0, condition, t, noise, scheduler, loss: str = "l1", channels_last=False,
                   amp_dtype: torch.dtype | None = None, prediction: str = "epsilon",
                   min_snr_gamma: float | None = None, snr_weight_floor: float | None = None) -> torch.Tensor:
    """Loss between the network's prediction from concat(x_t, condition) and its target: the noise (prediction
    "epsilon") or the velocity √ᾱ·ε − √(1−ᾱ)·x0 (prediction "v", MONAI's get_velocity). ``min_snr_gamma``: weight
    each sample's loss by min_snr_weights, with ``snr_weight_floor`` (both None: unweighted, the paper).

    All tensors on the model's device; amp_dtype: autocast dtype (None = fp32), weights stay fp32."""
    xt = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = model(model_input(xt, condition, channels_last), t)
    out = out.float()
    target = noise if prediction == "epsilon" else scheduler.get_velocity(x0, noise, t)
    loss_fn = F.l1_loss if loss == "l1" else F.mse_loss
    if min_snr_gamma is None and snr_weight_floor is None:
        return loss_fn(out, target)
    per_voxel = loss_fn(out, target, reduction="none")
    w = min_snr_weights(scheduler.alphas_cumprod, t, min_snr_gamma, prediction, loss, snr_weight_floor)
    return (per_voxel.flatten(1).mean(1) * w).mean()


@torch.no_grad()
def denoising_loss(model, items: list[dict], config: MedDDPMConfig, seed: int = 1234, n_draws: int = 8) -> float:
    """Mean held-out denoising loss over fixed (t, noise) draws: comparable across models for the same seed.
    Runs on the model's device; the draws are made on the CPU, so they are the same on every device."""
    sched = make_training_scheduler(config.timesteps, config.schedule)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    model.eval()
    losses = []
    for it in items:
        x0, cond = collate_pair([it])
        for _ in range(n_draws):
            t = torch.randint(0, config.timesteps, (1,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            losses.append(float(diffusion_loss(model, *(v.to(device) for v in (x0, cond, t, noise)), sched,
                                               config.loss, prediction=config.prediction,
                                               min_snr_gamma=config.min_snr_gamma,
                                               snr_weight_floor=config.snr_weight_floor)))
    return float(np.mean(losses))


def training_cases_hash(rows) -> str:
    """sha256 of the training cases: sorted (case_id, recorded sha256 of every file) of the manifest rows. A resume
    on other cases (or changed files) would keep stale intensity ranges and mix two cohorts: it is refused."""
    entries = sorted([str(r["case_id"])] + [str(r.get(f"sha256_{c}", "")) for c in FILE_COLUMNS]
                     for _, r in rows.iterrows())
    return sha256_bytes(json.dumps(entries).encode())


def _check_resume(state_path: Path, st: dict, cfg: MedDDPMConfig, cases_hash: str) -> None:
    """Refuse a resume that would change what is learned, saying what to do instead."""
    if st.get("config_hash") != cfg.hash():
        raise InputError(state_path, "checkpoint was trained with a different config (hash "
                                      f"{str(st.get('config_hash'))[:12]}… vs {cfg.hash()[:12]}…); use "
                                      "another --out folder or the same settings", kind="config-mismatch")
    horizon = st.get("lr_horizon")
    if cfg.lr_schedule == "cosine" and horizon is not None and int(horizon) != cfg.steps:
        raise InputError(state_path, f"this run's cosine learning rate decays over --steps {horizon}; resuming with "
                                      f"--steps {cfg.steps} would make the lr jump. Resume with --steps {horizon}, "
                                      "or start a new --out folder (e.g. --init-from this run's generator) for a "
                                      "longer schedule", kind="config-mismatch")
    if st.get("training_cases_hash") not in (None, cases_hash):
        raise InputError(state_path, "this run was trained on other cases (the training case list or its files "
                                      "changed since; hash "
                                      f"{str(st['training_cases_hash'])[:12]}… vs {cases_hash[:12]}…); resume on "
                                      "the same manifest rows or use another --out folder", kind="cases-mismatch")


def draw_loss_curve(ax, steps, losses) -> None:
    """The loss per step and its running mean on ``ax`` (loss_curve.png; the previews' lower panel)."""
    import pandas as pd

    loss = pd.Series(losses, dtype=float)
    ax.plot(steps, loss, lw=0.5, alpha=0.4, label="per step")
    ax.plot(steps, loss.rolling(max(1, len(loss) // 50), min_periods=1).mean(), lw=1.5, label="smoothed")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("denoising loss"), ax.legend(), ax.set_title("Med-DDPM training")


def plot_loss(log_path: str | Path, png_path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from core.fsutil import atomic_path

    df = pd.read_csv(log_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    draw_loss_curve(ax, df["step"], df["loss"])
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(png_path)


def _as_config(profile: str, config) -> MedDDPMConfig:
    if isinstance(config, MedDDPMConfig):
        return config
    return get_config(profile, **(config or {}))


@dataclass
class _Run:
    """What one training process holds: settings, where it runs, the network and its optimisation state."""
    cfg: MedDDPMConfig
    out: Path
    device: torch.device
    amp_dtype: torch.dtype | None
    ranks: Ranks
    net: torch.nn.Module            # the network itself (checkpointed, EMA source)
    model: torch.nn.Module          # what is called: `net`, or `net` inside DistributedDataParallel
    ema: torch.nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    rng: torch.Generator
    sampler: StepBatchSampler
    cases_hash: str
    step: int = 0
    log_rows: list | None = None


def train_medddpm(manifest: str | Path, profile: str, out_dir: str | Path,
                  config: MedDDPMConfig | dict | None = None, preview: PreviewConfig | None = None,
                  on_preview: Callable[[Path, int, int], None] | None = None) -> Path:
    """Train (or resume) a Med-DDPM generator; return the path of its EMA weights (generator.safetensors).

    manifest: data_manifest.csv; rows with source in config.sources and split in config.splits are used
    (real training rows by default). profile: a synth profile name (tiny, demo, paper-wholehead, paper-brats),
    whose settings `config` (a MedDDPMConfig or a dict of overrides such as {"steps": 200}) replaces/overrides.
    out_dir gets config.json, intensity_ranges.json, loss_log.csv, loss_curve.png, checkpoints/last.pt and
    generator.safetensors. Rerunning the same call after an interruption resumes from the last checkpoint.
    Launched by torchrun (WORLD_SIZE > 1), the processes train one model together and rank 0 writes.
    config.init_from (CLI --init-from): start from that generator's weights, taking its network settings
    (e.g. the authors' imported weights); the file's sha256 goes into the config (init_from_sha256), its hash and
    config.json.
    preview (CLI --preview-every): sample previews to out_dir/previews/ while training (synth.preview; they change
    nothing that is trained); on_preview(png, step, steps) is called after each one is written (e.g. a Prefect
    artifact, flows.tasks). The progress bar names the profile's step budget where --steps is below it (not when
    fine-tuning: the budget is for training from scratch), and the first steps' time is projected onto this run's
    steps and that budget (printed once).
    """
    cfg = _as_config(profile, config)
    if cfg.init_from:  # fine-tuning: the network is the init generator's, and the file counts by its content
        cfg = with_init_sha256(adopt_init_network(cfg))
    out = Path(out_dir)
    ranks = ranks_from_env()
    grid = _check_settings(cfg, ranks)
    device = rank_device(resolve_device(cfg.device), ranks)
    with deterministic_algorithms(cfg.deterministic), torch_threads(cfg.num_threads), process_group(device, ranks):
        rows = training_rows(manifest, cfg)
        cases_hash = training_cases_hash(rows)
        state = _resume_state(out, cfg, cases_hash)
        dataset = training_dataset(manifest, cfg, rows, shape=grid.shape)
        if ranks.main:
            _write_run_files(out, manifest, cfg, rows, cases_hash, dataset, device)
        previews = (Previews(preview, manifest, cfg, rows, out, on_preview)
                    if preview is not None and ranks.main and int((state or {}).get("step", 0)) < cfg.steps else None)
        run = _setup(cfg, out, device, ranks, len(dataset), cases_hash, state)
        sched = make_training_scheduler(cfg.timesteps, cfg.schedule)
        # the profile's steps are a budget for training from scratch; a fine-tuning run's own steps are its budget
        budget = cfg.steps if cfg.init_from else get_config(profile).steps
        _train_steps(run, _batches(dataset, run), lambda run_, batches: _optimizer_step(run_, batches, sched),
                     desc=train_description(cfg.steps, budget), preview=previews, budget=budget)
        if ranks.main:
            _finish(run)
    return out / GENERATOR_FILE


def _check_settings(cfg: MedDDPMConfig, ranks: Ranks):
    """The profile's voxel grid, after refusing settings that cannot train."""
    grid = get_profile(cfg.profile)
    if any(s % cfg.downsample_factor for s in grid.shape):
        raise ConfigError(f"profile {cfg.profile} shape {grid.shape} is not divisible by the network's "
                          f"downsampling factor {cfg.downsample_factor}")
    if cfg.warmup_steps >= cfg.steps:
        raise ConfigError(f"warmup_steps ({cfg.warmup_steps}) must be smaller than steps ({cfg.steps})")
    rank_shard(cfg.batch_size, cfg.grad_accum, ranks.world)  # the processes can share a step's samples
    return grid


def _resume_state(out: Path, cfg: MedDDPMConfig, cases_hash: str) -> dict | None:
    """The last checkpoint (every rank reads the same file), checked against this run's settings; None if new."""
    state_path = out / STATE_FILE
    _verify_run_files(out)
    if not state_path.exists():
        return None
    st = load_state(state_path)
    _check_resume(state_path, st, cfg, cases_hash)
    if int(st["step"]) < cfg.steps:
        print(f"{out}: resuming Med-DDPM training at step {int(st['step'])} of {cfg.steps} (the last checkpoint of "
              "a run that stopped there)", flush=True)
    return st


def read_training_record(out: str | Path) -> dict | None:
    """The training record of a training folder (RECORD_FILE), or None (a run from before records existed)."""
    try:
        return json.loads((Path(out) / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None


def training_damage(out: str | Path) -> list[tuple[Path, str]]:
    """(file, problem) for each file of a training folder whose sha256 differs from its training record: the
    resumable state, the generator, the intensity ranges. [] when intact or when there is no record."""
    out, record = Path(out), read_training_record(out)
    if record is None:
        return []
    damage = []
    for name, key in ((STATE_FILE, "state_sha256"), (GENERATOR_FILE, "generator_sha256"),
                      (RANGES_FILE, "ranges_sha256")):
        want = record.get(key)
        wanted = want if isinstance(want, list) else [want]
        try:
            intact = want is None or sha256_file(out / name) in wanted
        except FileNotFoundError:  # not written yet, or removed for rebuilding (by another rank)
            continue
        if not intact:
            damage.append((out / name, f"sha256 differs from the training record {out / RECORD_FILE}"))
    return damage


def _verify_run_files(out: Path) -> None:
    """Before a resume: a damaged state is refused (it cannot be rebuilt); a damaged generator or intensity-range
    file is removed, and made again from the state (the generator: the same bytes) or from the training cases."""
    for path, problem in training_damage(out):
        if path == out / STATE_FILE:
            raise InputError(path, f"damaged: {problem}, so training cannot resume from it. Restore it, or delete "
                                   f"{path.parent} and rerun the same command to train again from step 0",
                             kind="damaged")
        print(f"{path}: {problem}; rebuilding it", flush=True)
        path.unlink(missing_ok=True)  # every rank checks; _finish / the next checkpoint writes it again


def _ranges_current(path: Path) -> bool:
    """Whether the intensity-ranges file exists in the current gate format."""
    try:
        return json.loads(path.read_text()).get("format") == GATE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_run_files(out: Path, manifest, cfg: MedDDPMConfig, rows, cases_hash: str, dataset, device) -> None:
    """config.json, and the quality gate's intensity ranges, read one case at a time: written once, and again when
    missing (removed as damaged) or of an older gate format (synth.quality.GATE_FORMAT), the training record then
    following (a finished run's folder thus gets the current gate from the same command)."""
    out.mkdir(parents=True, exist_ok=True)
    if not _ranges_current(out / RANGES_FILE):
        cases = case_loader(dataset, _data_workers(cfg, device), batch_size=None)
        save_ranges(out / RANGES_FILE, intensity_ranges(cases, cfg.modalities))
        record = read_training_record(out)
        if record is not None:
            atomic_write_text(out / RECORD_FILE, json.dumps(
                {**record, "ranges_sha256": sha256_file(out / RANGES_FILE)}, indent=1))
    atomic_write_text(out / CONFIG_FILE, json.dumps({**cfg.to_dict(), "config_hash": cfg.hash(),
                                                     "manifest": str(Path(manifest).resolve()),
                                                     "train_cases": rows["case_id"].tolist(),
                                                     "training_cases_hash": cases_hash}, indent=1))


def _data_workers(cfg: MedDDPMConfig, device: torch.device) -> int:
    if cfg.data_workers is not None:
        return cfg.data_workers
    return 4 if device.type == "cuda" else 0  # a GPU step outruns reading five NIfTI files in the main process


def _setup(cfg: MedDDPMConfig, out: Path, device: torch.device, ranks: Ranks, n_cases: int, cases_hash: str,
           st: dict | None) -> _Run:
    """Network, EMA, optimizer, loss scaler and random generator: fresh from the seed, or restored from `st`."""
    torch.manual_seed(cfg.seed)  # initial weights only (the same on every rank); every later draw uses `rng`
    net = build_unet(cfg)  # with cfg.grad_checkpoint, its blocks are checkpointed (synth.network)
    if cfg.init_from:
        init_weights(net, cfg)
    net = net.to(device)
    # fp32 master weights and EMA, whatever the autocast; the copy's checkpointed blocks call their own forwards
    # (synth.grad_checkpoint binds each wrapper to its block), so ema(x, t) uses the EMA's weights
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    amp_dtype = autocast_dtype(device, cfg.precision)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    # fp16 needs loss scaling; bf16 has fp32's exponent range and does not
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    rng = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws on every device and every rank
    step = 0
    if st is not None:
        net.load_state_dict(st["model"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["optimizer"])
        if "scaler" in st and scaler.is_enabled():
            scaler.load_state_dict(st["scaler"])
        rng.set_state(st["rng"])
        step = int(st["step"])
    model = net
    if ranks.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    log_rows = ([{k: r.get(k, "") for k in LOG_FIELDS} for r in read_csv_log(out / LOSS_LOG, "step", step)]
                if ranks.main else [])
    sampler = StepBatchSampler(n_cases, cfg.seed, cfg.batch_size, cfg.grad_accum, cfg.steps, step,
                               ranks.rank, ranks.world)
    return _Run(cfg, out, device, amp_dtype, ranks, net, model, ema, opt, scaler, rng, sampler, cases_hash, step,
                log_rows)


def _batches(dataset, run: _Run):
    """This rank's micro-batches (image, condition) from the run's step on, read by DataLoader workers."""
    return iter(case_loader(dataset, _data_workers(run.cfg, run.device), batch_sampler=run.sampler,
                            collate_fn=collate_pair, pin_memory=run.device.type == "cuda"))


def _step_draws(run: _Run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's (timesteps, noise) micro-batches for one optimizer step. Every rank draws the whole step in the
    single-process order (per micro-batch of batch_size: timesteps, then noise) and keeps its own positions, so
    the generator stays the same on all ranks and the union of their draws is the single-process step's."""
    cfg, mine = run.cfg, set(run.sampler.positions())
    shape = (len(cfg.modalities), *get_profile(cfg.profile).shape)
    ts, noises = [], []
    for a in range(cfg.grad_accum):
        t = torch.randint(0, cfg.timesteps, (cfg.batch_size,), generator=run.rng)
        noise = torch.randn((cfg.batch_size, *shape), generator=run.rng)
        for k in range(cfg.batch_size):
            if a * cfg.batch_size + k in mine:
                ts.append(t[k])
                noises.append(noise[k])
    m = run.sampler.micro
    return [(torch.stack(ts[i:i + m]), torch.stack(noises[i:i + m])) for i in range(0, len(ts), m)]


def _optimizer_step(run: _Run, batches, sched) -> float:
    """The diffusion loss's forward and backward passes of one optimizer step over this rank's micro-batches
    (_train_steps zeroes the gradients before and steps the optimizer after); the step's mean loss over all ranks."""
    cfg = run.cfg
    draws = _step_draws(run)
    total = 0.0
    for i, (t, noise) in enumerate(draws):
        x0, cond = next(batches)
        x0, cond, t, noise = (v.to(run.device) for v in (x0, cond, t, noise))
        # DDP averages gradients over ranks once per step, at the last micro-batch
        last = i == len(draws) - 1
        with contextlib.nullcontext() if last or run.model is run.net else run.model.no_sync():
            loss = diffusion_loss(run.model, x0, cond, t, noise, sched, cfg.loss, cfg.channels_last,
                                  run.amp_dtype, cfg.prediction, cfg.min_snr_gamma,
                                  cfg.snr_weight_floor) / len(draws)
            run.scaler.scale(loss).backward()
        total += float(loss.detach())
    return mean_over_ranks(total, run.ranks, run.device)


@torch.no_grad()
def _update_ema(run: _Run) -> None:
    """Every rank updates its EMA from the same synchronised weights, so all EMAs stay equal without messages.
    Paper: the EMA is a copy of the model until ema_start."""
    cfg = run.cfg
    if run.step % cfg.ema_every:
        return
    if run.step < cfg.ema_start:
        run.ema.load_state_dict(run.net.state_dict())
        return
    for pe, pm in zip(run.ema.parameters(), run.net.parameters()):
        pe.lerp_(pm, 1.0 - cfg.ema_decay)
    for be, bm in zip(run.ema.buffers(), run.net.buffers()):
        be.copy_(bm)


def _checkpoint(run: _Run) -> None:
    """Loss log, generator and resumable state, each written atomically (rank 0 only)."""
    if not run.ranks.main:
        return
    cfg = run.cfg
    atomic_write_csv(run.out / LOSS_LOG, run.log_rows, LOG_FIELDS)
    save_generator(run.out / GENERATOR_FILE, run.ema, cfg, run.step)
    record = {"step": run.step, "generator_sha256": sha256_file(run.out / GENERATOR_FILE),
              "ranges_sha256": sha256_file(run.out / RANGES_FILE) if (run.out / RANGES_FILE).exists() else None}
    before = (read_training_record(run.out) or {}).get("state_sha256") or []
    with atomic_path(run.out / STATE_FILE) as tmp:
        torch.save({"model": run.net.state_dict(), "ema": run.ema.state_dict(), "optimizer": run.opt.state_dict(),
                    "scaler": run.scaler.state_dict(), "rng": run.rng.get_state(), "step": run.step,
                    "config_hash": cfg.hash(), "config": cfg.to_json(), "lr_horizon": cfg.steps,
                    "training_cases_hash": run.cases_hash}, tmp)
        state_sha = sha256_file(tmp)
        # a kill from here until the record below leaves the old or the new state: both count as intact
        atomic_write_text(run.out / RECORD_FILE, json.dumps({**record, "state_sha256": [*before[-1:], state_sha]}))
    atomic_write_text(run.out / RECORD_FILE, json.dumps({**record, "state_sha256": [state_sha]}, indent=1))


PROJECT_AFTER = 3  # steps timed (after this call's first, which warms up) before the projection is printed


def _steps_text(n: int) -> str:
    """100000 -> '100k', 12000 -> '12k', 700 -> '700'."""
    return f"{n // 1000}k" if n >= 10_000 and n % 1000 == 0 else str(n)


def train_description(steps: int, budget: int | None) -> str:
    """The progress bar's description: it names the profile's step budget when this run's --steps is below it."""
    if budget is not None and steps < budget:
        return f"Med-DDPM train ({_steps_text(steps)} of the profile's {_steps_text(budget)} steps)"
    return "Med-DDPM train"


def projection(seconds_per_step: float, steps: int, budget: int) -> str:
    """The once-printed projection: this run's steps and the profile's budget at the measured time per step."""
    def dur(sec: float) -> str:
        return f"{sec / 3600:.1f} h" if sec >= 5400 else f"{sec / 60:.1f} min" if sec >= 90 else f"{sec:.0f} s"

    text = f"Med-DDPM train: {seconds_per_step:.3g} s per step here (the median of {PROJECT_AFTER} steps): "
    text += f"this run's {_steps_text(steps)} steps take about {dur(seconds_per_step * steps)}"
    if budget != steps:
        text += f", the profile's {_steps_text(budget)} steps about {dur(seconds_per_step * budget)}"
    return text + " (checkpoints and previews not counted)"


def _train_steps(run: _Run, batches, backward, desc: str = "Med-DDPM train", what: str = "training",
                 preview: Previews | None = None, budget: int | None = None) -> None:
    """Optimizer steps from run.step to cfg.steps: the lr of the step, zeroed gradients, ``backward(run, batches)``
    (the forward and backward passes of one step over its micro-batches; returns the step's mean loss), the
    optimizer step (through the loss scaler, which only fp16 enables), the EMA update, the loss log, the progress bar
    and periodic checkpoints. Training (_optimizer_step) and distillation (synth.distill) share it. ``what`` names
    the loss in the error of a non-finite one; ``preview``: a synth.preview.Previews, called after each step (rank 0
    only; it draws nothing from the run's generator). ``budget``: the profile's steps, onto which the time of this
    call's first steps is projected (printed once by rank 0)."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    bar = tqdm(total=cfg.steps, initial=run.step, desc=desc, dynamic_ncols=True,
               disable=not cfg.progress or not run.ranks.main)
    run.model.train()
    timed = []  # seconds of this call's steps after its first, until the projection is printed
    while run.step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(cfg, run.step)
        for g in run.opt.param_groups:
            g["lr"] = lr
        run.opt.zero_grad(set_to_none=True)
        loss = backward(run, batches)
        if not math.isfinite(loss):
            raise RuntimeError(f"{run.out}: {what} loss became {loss} at step {run.step + 1}; lower the lr (--lr)")
        run.scaler.step(run.opt)
        run.scaler.update()
        run.step += 1
        _update_ema(run)
        seconds = time.perf_counter() - t0
        if run.ranks.main:
            run.log_rows.append({"step": run.step, "loss": f"{loss:.6f}", "lr": f"{lr:.3g}",
                                 "seconds": f"{seconds:.4f}"})
            if budget is not None and timed is not None:
                timed.append(seconds)
                if len(timed) == PROJECT_AFTER + 1:
                    tqdm.write(projection(float(np.median(timed[1:])), cfg.steps, budget))
                    timed = None
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2g}")
        if run.step % cfg.checkpoint_every == 0 or run.step == cfg.steps:
            _checkpoint(run)
        if preview is not None and run.ranks.main:
            preview.after_step(run)
    bar.close()


def _finish(run: _Run) -> None:
    """A run resumed at its last step still leaves its generator, state and loss curve."""
    if not (run.out / STATE_FILE).exists() or read_training_record(run.out) is None:  # a run without record
        _checkpoint(run)
    elif not (run.out / GENERATOR_FILE).exists():  # removed as damaged: the same bytes again from the state's EMA
        save_generator(run.out / GENERATOR_FILE, run.ema, run.cfg, run.step)
        record = read_training_record(run.out)
        atomic_write_text(run.out / RECORD_FILE, json.dumps(
            {**record, "generator_sha256": sha256_file(run.out / GENERATOR_FILE)}, indent=1))
    if run.log_rows:
        plot_loss(run.out / LOSS_LOG, run.out / "loss_curve.png")

"""Med-DDPM training: ε-prediction with L1 (or L2) loss on the cosine schedule, Adam, gradient accumulation,
EMA, atomic resumable checkpoints and a loss log.

Every random draw (timesteps, noise) comes from one torch.Generator whose state is checkpointed, and the data
order is a function of (seed, epoch), so a run killed with SIGKILL and restarted continues the same loss curve.
"""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cohort.device import autocast_dtype, resolve_device
from cohort.errors import CohortError, ConfigError
from cohort.fsutil import atomic_torch_save, atomic_write_csv, atomic_write_text, read_csv_log, sha256_bytes
from cohort.manifest import FILE_COLUMNS
from cohort.profiles import get_profile
from cohort.threads import torch_threads

from .checkpoint import CONFIG_FILE, GENERATOR_FILE, LOSS_LOG, RANGES_FILE, STATE_FILE, load_state, save_generator
from .config import MedDDPMConfig, get_config
from .data import load_items, training_rows
from .network import build_unet
from .quality import intensity_ranges, save_ranges
from .schedulers import make_training_scheduler, model_input

LOG_FIELDS = ("step", "loss", "lr", "seconds")


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


def diffusion_loss(model, x0, condition, t, noise, scheduler, loss: str = "l1", channels_last=False,
                   amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Loss between the true noise and the network's prediction from concat(x_t, condition).

    All tensors on the model's device; amp_dtype: autocast dtype (None = fp32), weights stay fp32."""
    xt = scheduler.add_noise(original_samples=x0, noise=noise, timesteps=t)
    with torch.autocast(x0.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        eps = model(model_input(xt, condition, channels_last), t)
    eps = eps.float()
    return F.l1_loss(eps, noise) if loss == "l1" else F.mse_loss(eps, noise)


def _batch(items: list[dict], idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([torch.as_tensor(items[i]["image"]) for i in idx]),
            torch.stack([torch.as_tensor(items[i]["condition"]) for i in idx]))


def _order(seed: int, epoch: int, n: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


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
        x0, cond = _batch([it], [0])
        for _ in range(n_draws):
            t = torch.randint(0, config.timesteps, (1,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            losses.append(float(diffusion_loss(model, *(v.to(device) for v in (x0, cond, t, noise)), sched,
                                               config.loss)))
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
        raise CohortError(state_path, "checkpoint was trained with a different config (hash "
                                      f"{str(st.get('config_hash'))[:12]}… vs {cfg.hash()[:12]}…); use "
                                      "another --out folder or the same settings", kind="config-mismatch")
    horizon = st.get("lr_horizon")
    if cfg.lr_schedule == "cosine" and horizon is not None and int(horizon) != cfg.steps:
        raise CohortError(state_path, f"this run's cosine learning rate decays over --steps {horizon}; resuming with "
                                      f"--steps {cfg.steps} would make the lr jump. Resume with --steps {horizon}, "
                                      "or start a new --out folder (e.g. --init-from this run's generator) for a "
                                      "longer schedule", kind="config-mismatch")
    if st.get("training_cases_hash") not in (None, cases_hash):
        raise CohortError(state_path, "this run was trained on other cases (the training case list or its files "
                                      "changed since; hash "
                                      f"{str(st['training_cases_hash'])[:12]}… vs {cases_hash[:12]}…); resume on "
                                      "the same manifest rows or use another --out folder", kind="cases-mismatch")


def plot_loss(log_path: str | Path, png_path: str | Path) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from cohort.fsutil import atomic_path

    df = pd.read_csv(log_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(df["step"], df["loss"], lw=0.5, alpha=0.4, label="per step")
    ax.plot(df["step"], df["loss"].rolling(max(1, len(df) // 50), min_periods=1).mean(), lw=1.5, label="smoothed")
    ax.set_xlabel("optimizer step"), ax.set_ylabel("denoising loss"), ax.legend(), ax.set_title("Med-DDPM training")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return Path(png_path)


def _as_config(profile: str, config) -> MedDDPMConfig:
    if isinstance(config, MedDDPMConfig):
        return config
    return get_config(profile, **(config or {}))


def train_medddpm(manifest: str | Path, profile: str, out_dir: str | Path,
                  config: MedDDPMConfig | dict | None = None) -> Path:
    """Train (or resume) a Med-DDPM generator; return the path of its EMA weights (generator.safetensors).

    manifest: data_manifest.csv; rows with source in config.sources and split in config.splits are used
    (real training rows by default). profile: a synth profile name (tiny, demo, paper-wholehead, paper-brats),
    whose settings `config` (a MedDDPMConfig or a dict of overrides such as {"steps": 200}) replaces/overrides.
    out_dir gets config.json, intensity_ranges.json, loss_log.csv, loss_curve.png, checkpoints/last.pt and
    generator.safetensors. Rerunning the same call after an interruption resumes from the last checkpoint.
    config.init_from (CLI --init-from): start from that generator's weights, taking its network settings
    (e.g. the authors' imported weights); recorded in config.json with the file's sha256.
    """
    cfg = _as_config(profile, config)
    if cfg.init_from:  # fine-tuning: the network is the init generator's (synth.authors_weights)
        from .authors_weights import adopt_init_network

        cfg = adopt_init_network(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = get_profile(cfg.profile)
    if any(s % cfg.downsample_factor for s in grid.shape):
        raise ConfigError(f"profile {cfg.profile} shape {grid.shape} is not divisible by the network's "
                                f"downsampling factor {cfg.downsample_factor}")
    if cfg.warmup_steps >= cfg.steps:
        raise ConfigError(f"warmup_steps ({cfg.warmup_steps}) must be smaller than steps ({cfg.steps})")
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(device, cfg.precision)
    state_path, log_path = out / STATE_FILE, out / LOSS_LOG
    with torch_threads(cfg.num_threads):
        rows = training_rows(manifest, cfg)
        cases_hash = training_cases_hash(rows)
        st = load_state(state_path) if state_path.exists() else None
        if st is not None:
            _check_resume(state_path, st, cfg, cases_hash)
        items = load_items(manifest, cfg, rows, shape=grid.shape)
        if not (out / RANGES_FILE).exists():
            save_ranges(out / RANGES_FILE, intensity_ranges(items, cfg.modalities))

        torch.manual_seed(cfg.seed)  # initial weights only; every later draw uses `rng`
        model = build_unet(cfg)
        init_sha = None
        if cfg.init_from:
            from .authors_weights import init_weights

            init_sha = init_weights(model, cfg)
        model = model.to(device)
        ema = copy.deepcopy(model).eval().requires_grad_(False)  # fp32 master weights and EMA, whatever amp_dtype
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        # fp16 needs loss scaling; bf16 has fp32's exponent range and does not
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        rng = torch.Generator().manual_seed(cfg.seed)  # on the CPU: the same draws on every device
        step = 0
        if st is not None:
            model.load_state_dict(st["model"])
            ema.load_state_dict(st["ema"])
            opt.load_state_dict(st["optimizer"])
            if "scaler" in st and scaler.is_enabled():
                scaler.load_state_dict(st["scaler"])
            rng.set_state(st["rng"])
            step = int(st["step"])
        log_rows = [{k: r.get(k, "") for k in LOG_FIELDS} for r in read_csv_log(log_path, "step", step)]
        atomic_write_text(out / CONFIG_FILE, json.dumps({**cfg.to_dict(), "config_hash": cfg.hash(),
                                                         "manifest": str(Path(manifest).resolve()),
                                                         "train_cases": rows["case_id"].tolist(),
                                                         "training_cases_hash": cases_hash,
                                                         **({"init_from_sha256": init_sha} if init_sha else {})},
                                                        indent=1))

        sched = make_training_scheduler(cfg.timesteps, cfg.schedule)
        n, per_step = len(items), cfg.batch_size * cfg.grad_accum

        def checkpoint():
            atomic_write_csv(log_path, log_rows, LOG_FIELDS)
            save_generator(out / GENERATOR_FILE, ema, cfg, step)
            atomic_torch_save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                               "scaler": scaler.state_dict(), "rng": rng.get_state(), "step": step,
                               "config_hash": cfg.hash(), "config": cfg.to_json(), "lr_horizon": cfg.steps,
                               "training_cases_hash": cases_hash}, state_path)

        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc="Med-DDPM train", disable=not cfg.progress,
                   dynamic_ncols=True)
        model.train()
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for a in range(cfg.grad_accum):
                start = step * per_step + a * cfg.batch_size
                idx = [_order(cfg.seed, c // n, n)[c % n] for c in range(start, start + cfg.batch_size)]
                x0, cond = _batch(items, idx)
                t = torch.randint(0, cfg.timesteps, (x0.shape[0],), generator=rng)
                noise = torch.randn(x0.shape, generator=rng)
                x0, cond, t, noise = (v.to(device) for v in (x0, cond, t, noise))
                loss = diffusion_loss(model, x0, cond, t, noise, sched, cfg.loss, cfg.channels_last,
                                      amp_dtype) / cfg.grad_accum
                scaler.scale(loss).backward()
                total += float(loss.detach())
            if not math.isfinite(total):
                raise RuntimeError(f"{out}: training loss became {total} at step {step + 1}; lower the lr")
            scaler.step(opt)
            scaler.update()
            step += 1
            if step % cfg.ema_every == 0:  # paper: EMA is a copy of the model until ema_start
                with torch.no_grad():
                    if step < cfg.ema_start:
                        ema.load_state_dict(model.state_dict())
                    else:
                        for pe, pm in zip(ema.parameters(), model.parameters()):
                            pe.lerp_(pm, 1.0 - cfg.ema_decay)
                        for be, bm in zip(ema.buffers(), model.buffers()):
                            be.copy_(bm)
            log_rows.append({"step": step, "loss": f"{total:.6f}", "lr": f"{lr:.3g}",
                             "seconds": f"{time.perf_counter() - t0:.4f}"})
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2g}")
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                checkpoint()
        bar.close()
        if not (out / GENERATOR_FILE).exists() or not state_path.exists():
            checkpoint()
        if log_rows:
            plot_loss(log_path, out / "loss_curve.png")
    return out / GENERATOR_FILE

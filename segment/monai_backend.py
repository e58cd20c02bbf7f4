"""MONAI back end: SegResNet or DynUNet + DiceCE, whole-volume (or patch) training, real-only validation with early
stopping.

Files in model_dir (same names for both back ends, see docs/segment.md):
  config.json, training_data.json, train_log.csv, model.safetensors (final = best-validation weights),
  resume.pt (weights_only-loadable state of the last finished epoch; deleted when training completes).
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from cohort.case import Case
from core.errors import InputError
from core.fsutil import atomic_path, atomic_torch_save, atomic_write_csv, atomic_write_text, read_csv_log
from cohort.nifti import write_array
from core.device import resolve_device
from core.threads import torch_threads
from cohort.volume import Volume

from .config import SegmenterConfig, load_config
from .data import N_CLASSES, load_cases, normalise

LOG_COLUMNS = ("epoch", "train_loss", "val_dice", "lr", "seconds")


# Seeding + building a network, and each epoch's reseed, touch torch's global RNG, which every thread shares: with
# trainings in parallel threads (the study's default) an unguarded reseed in one training landed inside another's
# network init, so its initial weights, and its Dice, depended on timing (docs/decisions/0007-seed-under-one-lock.md).
_INIT_LOCK = threading.Lock()


def build_network(cfg: SegmenterConfig, in_channels: int) -> torch.nn.Module:
    """SegResNet (additive skips), or DynUNet (nnU-Net-like: concatenating skips, instance norm, two convolutions
    per level); both have len(blocks_down) levels with init_filters * 2**level channels."""
    levels = len(cfg.blocks_down)
    if cfg.network == "dynunet":
        from monai.networks.nets import DynUNet

        return DynUNet(spatial_dims=3, in_channels=in_channels, out_channels=N_CLASSES, kernel_size=[3] * levels,
                       strides=[1] + [2] * (levels - 1), upsample_kernel_size=[2] * (levels - 1),
                       filters=[cfg.init_filters * 2 ** i for i in range(levels)], norm_name="instance",
                       res_block=False)
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, in_channels=in_channels, out_channels=N_CLASSES, init_filters=cfg.init_filters,
                     blocks_down=tuple(cfg.blocks_down), blocks_up=tuple(cfg.blocks_up), dropout_prob=None)


def bottleneck_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The deepest encoder feature map of either network for a batch x."""
    if hasattr(model, "encode"):  # SegResNet
        return model.encode(x)[0]
    seen: list[torch.Tensor] = []
    hook = model.bottleneck.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        model(x)
    finally:
        hook.remove()
    return seen[0]


def _divisor(cfg: SegmenterConfig) -> int:
    return 2 ** (len(cfg.blocks_down) - 1)


def _roi_size(cfg: SegmenterConfig, shape: Sequence[int]) -> tuple[int, int, int]:
    """Sliding-window ROI: the training patch, or the whole (padded) volume for whole-volume training."""
    k = _divisor(cfg)
    if cfg.patch_size is not None:
        return tuple(int(p) for p in cfg.patch_size)  # type: ignore[return-value]
    return tuple(int(-(-s // k) * k) for s in shape)  # type: ignore[return-value]


def train_transforms(cfg: SegmenterConfig):
    """MONAI augmentation per cfg.augment; random patches first if patch_size is set.

    light: left-right flip, intensity scale/shift. nnunet: nnU-Net's default pipeline in MONAI transforms (rotation
    and scaling, Gaussian noise and blur, brightness, contrast, gamma, mirroring on every axis), with nnU-Net's
    probabilities; it makes a segmenter lean on shapes more than on exact intensities."""
    from monai.transforms import (Compose, DivisiblePadd, RandAdjustContrastd, RandAffined, RandCropByPosNegLabeld,
                                  RandFlipd, RandGaussianNoised, RandGaussianSmoothd, RandScaleIntensityd,
                                  RandShiftIntensityd, SpatialPadd)

    keys = ("image", "label")
    t = [DivisiblePadd(keys=keys, k=_divisor(cfg), mode="edge")]
    if cfg.patch_size is not None:
        t += [SpatialPadd(keys=keys, spatial_size=cfg.patch_size, mode="edge"),
              RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=cfg.patch_size,
                                     pos=2, neg=1, num_samples=1)]
    if cfg.augment == "light":
        t += [RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
              RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
              RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)]
    elif cfg.augment == "nnunet":
        rot = np.deg2rad(30)
        t += [RandAffined(keys=keys, prob=0.2, rotate_range=(rot, rot, rot), scale_range=(0.3, 0.3, 0.3),
                          mode=("bilinear", "nearest"), padding_mode="border"),
              RandGaussianNoised(keys="image", prob=0.1, std=0.1),
              RandGaussianSmoothd(keys="image", prob=0.2, sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0),
                                  sigma_z=(0.5, 1.0)),
              RandScaleIntensityd(keys="image", factors=0.25, prob=0.15),
              RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
              *(RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(3))]
    return Compose(t)


def _predict_logits(model: torch.nn.Module, cfg: SegmenterConfig, image: np.ndarray) -> torch.Tensor:
    """(C, X, Y, Z) normalised image -> (N_CLASSES, X, Y, Z) logits, via MONAI's sliding-window inferer."""
    from monai.inferers import sliding_window_inference
    from monai.transforms import DivisiblePad

    x = torch.from_numpy(image)
    padded = DivisiblePad(k=_divisor(cfg), mode="edge")(x)
    device = next(model.parameters()).device
    with torch.no_grad():  # windows run on the model's device; the stitched logits come back to the CPU
        logits = sliding_window_inference(padded[None].float(), _roi_size(cfg, image.shape[1:]), 1, model,
                                          overlap=0.25, mode="gaussian", sw_device=device,
                                          device=torch.device("cpu"))[0]
    return logits[:, : image.shape[1], : image.shape[2], : image.shape[3]]


def _val_dice(model, cfg, cases: list[Case]) -> float:
    """Mean Dice over the validation cases and the BraTS regions WT, TC, ET: the Dice the study reports
    (eval.segmentation.region_dice, BraTS rule for empty regions), so the best epoch is best by that measure."""
    from eval.segmentation import region_dice

    model.eval()
    return float(np.mean([region_dice(_predict_logits(model, cfg, c.image.data).argmax(0).numpy(), c.label_map)
                          for c in cases]))


def _save_safetensors(model: torch.nn.Module, path: Path) -> None:
    """The weights, byte-identical for identical weights. DynUNet's state dict names each weight twice
    (skip_layers aliases): each tensor is kept once, under its first name in sorted order, which
    safetensors' load_model maps back. (save_model drops the aliases too, but records them in a header map that
    safetensors writes in a random order, so the same weights gave a different file, and hash, at every save.)"""
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, t in sorted(model.state_dict().items()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key not in seen:
            seen.add(key)
            tensors[name] = t.detach().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def _save_resume(path: Path, state: dict) -> None:
    atomic_torch_save(state, path)


@dataclass
class _Progress:
    """What a resume restores besides the weights: the next epoch to run and the early-stopping state."""

    epoch: int = 0
    best: float = -1.0      # best validation Dice so far (-1: none yet)
    best_epoch: int = -1
    stale: int = 0          # validations since the best one


def weight_average(model: torch.nn.Module, cfg: SegmenterConfig):
    """torch's AveragedModel keeping an exponential moving average of the weights (decay cfg.ema_decay per
    optimiser step), or None when cfg.ema_decay is 0: the averaged weights are what is validated and saved."""
    if not cfg.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(cfg.ema_decay)), use_buffers=True)


def _resume(path: Path, model, opt, sched, ema=None) -> _Progress:
    """Load resume.pt (the last finished epoch) into model, optimiser, scheduler and the weight average; a fresh
    _Progress without it."""
    if not path.exists():
        return _Progress()
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(path, f"unreadable resume checkpoint ({e}); delete it to start over",
                          kind="unreadable") from e
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    sched.load_state_dict(st["scheduler"])
    if ema is not None:
        ema.load_state_dict(st["ema"])
    return _Progress(int(st["epoch"]) + 1, float(st["best"]), int(st["best_epoch"]), int(st["stale"]))


def _train_epoch(model, opt, loss_fn, tfm, cases: list[Case], cfg: SegmenterConfig, epoch: int, ema=None) -> float:
    """cfg.iters_per_epoch optimiser steps on batches drawn from the cases; returns the mean loss.

    All randomness is derived from (seed, epoch): a resumed run replays the same stream.
    """
    with _INIT_LOCK:  # not inside another thread's network init
        torch.manual_seed(cfg.seed * 100_003 + epoch)
    tfm.set_random_state(seed=(cfg.seed * 100_003 + epoch) % (2 ** 32))
    rng = np.random.default_rng([cfg.seed, epoch])
    n = cfg.iters_per_epoch * cfg.batch_size
    order = np.concatenate([rng.permutation(len(cases)) for _ in range(-(-n // len(cases)))])[:n]
    model.train()
    losses = []
    for it in range(cfg.iters_per_epoch):
        items = [tfm({"image": cases[i].image.data, "label": cases[i].label.data})
                 for i in order[it * cfg.batch_size:(it + 1) * cfg.batch_size]]
        items = [d[0] if isinstance(d, list) else d for d in items]  # RandCropByPosNegLabeld returns a list
        device = next(model.parameters()).device
        x = torch.stack([torch.as_tensor(d["image"]).float() for d in items]).to(device)
        y = torch.stack([torch.as_tensor(d["label"]).long() for d in items]).to(device)
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        losses.append(float(loss.detach()))
    return float(np.mean(losses))


def _validate(model, cfg: SegmenterConfig, cases: list[Case], epoch: int, progress: _Progress,
              best_path: Path) -> float:
    """Validation Dice after this epoch (nan when it is not a validation epoch); a new best is saved to best_path."""
    if not cases or not ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
        return float("nan")
    val = _val_dice(model, cfg, cases)
    if val > progress.best + 1e-4:
        progress.best, progress.best_epoch, progress.stale = val, epoch, 0
        _save_safetensors(model, best_path)
    else:
        progress.stale += 1
    return val


def _checkpoint(path: Path, model, opt, sched, epoch: int, progress: _Progress, ema=None) -> None:
    """resume.pt after a finished epoch (weights_only-loadable: tensors and numbers only)."""
    state = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                 epoch=epoch, best=progress.best, best_epoch=progress.best_epoch, stale=progress.stale)
    if ema is not None:
        state["ema"] = ema.state_dict()
    _save_resume(path, state)


def _finish(model_dir: Path, model, progress: _Progress, log: list[dict], n_train: int, n_val: int) -> None:
    """model.safetensors (the best validation weights, else the last), training_summary.json; resume.pt removed."""
    final, best_path = model_dir / "model.safetensors", model_dir / "best.safetensors"
    if best_path.exists():
        best_path.replace(final)
    else:
        _save_safetensors(model, final)
    summary = dict(best_val_dice=progress.best if progress.best >= 0 else None,
                   best_epoch=progress.best_epoch if progress.best_epoch >= 0 else None,
                   epochs_run=len(log), n_train=n_train, n_val=n_val)
    atomic_write_text(model_dir / "training_summary.json", json.dumps(summary, indent=2))
    (model_dir / "resume.pt").unlink(missing_ok=True)


def train(manifest: Path, train_ids: list[str], val_ids: list[str], model_dir: Path, cfg: SegmenterConfig) -> Path:
    """Train (or resume) a MONAI network in model_dir; returns model_dir. config.json/training_data.json are the
    caller's."""
    from monai.losses import DiceCELoss

    mods = list(cfg.modalities)
    train_cases = load_cases(manifest, train_ids, mods)
    val_cases = load_cases(manifest, val_ids, mods) if val_ids else []
    resume_path, log_path = model_dir / "resume.pt", model_dir / "train_log.csv"
    best_path = model_dir / "best.safetensors"

    with torch_threads(cfg.num_threads):
        with _INIT_LOCK:
            torch.manual_seed(cfg.seed)
            model = build_network(cfg, len(mods))
        if cfg.init_from is not None:  # fine-tuning (checked by segment.api.check_pretrained); a resume overrides it
            load_weights(model, Path(cfg.init_from))
        model = model.to(resolve_device(cfg.device))
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=cfg.epochs, power=0.9)
        # Dice over the tumour labels only, pooled over the batch (as nnU-Net): with the per-sample Dice including
        # background, the small NCR/ET labels collapsed into ED on the demo phantom (val ET Dice 0.30 -> 0.00)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        tfm = train_transforms(cfg)
        ema = weight_average(model, cfg)
        evaluated = model if ema is None else ema.module  # the weights that are validated and saved
        progress = _resume(resume_path, model, opt, sched, ema)
        log = read_csv_log(log_path, "epoch", progress.epoch - 1)

        bar = tqdm(range(progress.epoch, cfg.epochs), desc=f"segment[monai] {model_dir.name}", unit="epoch",
                   initial=progress.epoch, total=cfg.epochs)
        for epoch in bar:
            if val_cases and progress.stale >= cfg.patience and epoch >= cfg.min_epochs:
                break  # early stopping
            t0 = time.perf_counter()
            loss = _train_epoch(model, opt, loss_fn, tfm, train_cases, cfg, epoch, ema)
            lr = opt.param_groups[0]["lr"]
            sched.step()
            val = _validate(evaluated, cfg, val_cases, epoch, progress, best_path)
            log.append(dict(epoch=epoch, train_loss=f"{loss:.5f}", val_dice=f"{val:.4f}", lr=f"{lr:.3g}",
                            seconds=f"{time.perf_counter() - t0:.2f}"))
            atomic_write_csv(log_path, log, LOG_COLUMNS)
            _checkpoint(resume_path, model, opt, sched, epoch, progress, ema)
            bar.set_postfix(loss=f"{loss:.3f}", val_dice=f"{val:.3f}", best=f"{progress.best:.3f}")
        bar.close()
    _finish(model_dir, evaluated, progress, log, len(train_ids), len(val_ids))
    return model_dir


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """A model.safetensors into model, every weight (the output layer too: pre-training and fine-tuning predict the
    same labels); InputError naming the file when its tensors do not fit the network."""
    from safetensors.torch import load_model as load_safetensors

    try:
        load_safetensors(model, str(path), strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(path, f"these weights do not fit the network being trained ({first}); pre-train with the "
                               "same network, channels and sizes", kind="model-mismatch") from e


def load_model(model_dir: str | Path) -> tuple[torch.nn.Module, SegmenterConfig]:
    """The trained network (eval mode) and its config, from model.safetensors + config.json."""
    from safetensors.torch import load_model as load_safetensors

    model_dir = Path(model_dir)
    cfg = load_config(model_dir)
    w_path = model_dir / "model.safetensors"
    if not w_path.exists():
        raise InputError(w_path, "missing: not a finished segmenter model directory", kind="missing-file")
    if cfg.backend != "monai":
        raise InputError(model_dir / "config.json", f"backend is {cfg.backend!r}; only MONAI models load as torch "
                                                     "modules", kind="bad-config")
    model = build_network(cfg, len(cfg.modalities))
    load_safetensors(model, str(w_path))
    model.eval()
    return model, cfg


def predict(model_dir: Path, manifest: Path, case_ids: list[str], out_dir: Path, device: str | None = None
            ) -> dict[str, Path]:
    """device: where to run (default: the config's device setting, auto = CUDA when present)."""
    model, cfg = load_model(model_dir)
    model.to(resolve_device(device or cfg.device))
    out: dict[str, Path] = {}
    with torch_threads(cfg.num_threads):
        for c in tqdm(load_cases(manifest, case_ids, cfg.modalities), desc="segment[monai] predict", unit="case"):
            label = _predict_logits(model, cfg, c.image.data).argmax(0).numpy().astype(np.uint8)
            out[c.case_id] = write_array(out_dir / f"{c.case_id}.nii.gz", label, c.affine)
    return out


def encoder_features(model_dir_or_model, volume: Volume | np.ndarray, cfg: SegmenterConfig | None = None) -> np.ndarray:
    """Global-average-pooled bottleneck (deepest encoder) features of a trained model for one volume.

    model_dir_or_model: a model dir, or (model, cfg) from load_model (faster for many volumes).
    volume: a Volume (channels picked by the model's modalities) or a raw (C, X, Y, Z) array in that order.
    """
    if isinstance(model_dir_or_model, (str, Path)):
        model, cfg = load_model(model_dir_or_model)
    elif isinstance(model_dir_or_model, tuple):
        model, cfg = model_dir_or_model
    else:
        model = model_dir_or_model
        if cfg is None:
            raise ValueError("encoder_features(model, volume) needs cfg= when given a bare module")
    if isinstance(volume, Volume):
        image = np.stack([volume.channel(m) for m in cfg.modalities])
    else:
        image = np.asarray(volume, np.float32)
    if image.ndim != 4 or image.shape[0] != len(cfg.modalities):
        raise ValueError(f"expected a (C={len(cfg.modalities)}, X, Y, Z) volume, got shape {image.shape}")
    from monai.transforms import DivisiblePad

    x = DivisiblePad(k=_divisor(cfg), mode="edge")(torch.from_numpy(normalise(image)))[None].float()
    model.eval()
    with torch.no_grad():
        deepest = bottleneck_features(model, x)
    return deepest.mean(dim=(2, 3, 4))[0].numpy().astype(np.float64)

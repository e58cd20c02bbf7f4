"""Training previews (`medddpm train --preview-every N`): every N optimizer steps and at the last one, a PNG of
samples drawn from the EMA weights as they are at that step, on a fixed set of the training manifest's conditioning
masks with fixed seeds, each beside the real image of its mask, above the loss curve so far. The files are
OUT/previews/step_000500.png and OUT/previews/latest.png (the newest), each written atomically, so they can be
opened while training runs.

A preview does not change what is trained: its sampler draws from its own torch.Generator per mask (seeded, synth.
schedulers.sample), never from the run's generator; it reads the EMA (always in eval mode and without gradients),
not the network being trained, whose train mode and the autocast of the training step stay as they are; its masks
are read into their own copies. The cheap sampler: DDIM (eta 0) with ``sampling_steps`` steps (10 by default): all
masks in one batch on the CPU, one at a time on a GPU (the memory of one sampled volume beside the training's). Only
rank 0 writes (synth.train._train_steps).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from core.errors import ConfigError, InputError
from core.fsutil import atomic_path, atomic_write_bytes
from cohort.labels import tumour_slice
from cohort.profiles import get_profile

from .config import MedDDPMConfig

PREVIEW_DIR = "previews"
LATEST = "latest.png"
DEFAULT_MASKS = 3
DEFAULT_SAMPLING_STEPS = 10


@dataclass(frozen=True)
class PreviewConfig:
    """What a training preview shows (plain data). Not part of the training config: previews change nothing that is
    learned, and the generator's bytes are the same with and without them."""

    every: int                                   # optimizer steps between previews (one more at the last step)
    case_ids: tuple[str, ...] | None = None      # training rows whose masks are sampled; None: n_masks of them
    n_masks: int = DEFAULT_MASKS                 # spread evenly over the training rows sorted by case ID
    sampling_steps: int = DEFAULT_SAMPLING_STEPS  # DDIM (eta 0) steps per sample
    seed: int = 0                                # mask i is sampled with seed + i at every preview

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"--preview-every must be >= 1 optimizer steps, not {self.every}")
        if not 1 <= self.n_masks <= 8:
            raise ConfigError(f"a preview shows 1 to 8 masks, not {self.n_masks}")
        if self.sampling_steps < 1:
            raise ConfigError(f"preview sampling steps must be >= 1, not {self.sampling_steps}")

    def due(self, step: int, total: int) -> bool:
        """Whether optimizer step ``step`` (1-based, after it) of a ``total``-step run gets a preview."""
        return step % self.every == 0 or step == total


def preview_cases(manifest: str | Path, rows: pd.DataFrame, settings: PreviewConfig) -> list[str]:
    """The case IDs whose masks the previews sample on: settings.case_ids (each must be a training row), else
    n_masks spread evenly over the training rows sorted by case ID (the same ones at every resume)."""
    ids = sorted(rows["case_id"].astype(str))
    if settings.case_ids:
        unknown = [c for c in settings.case_ids if c not in set(ids)]
        if unknown:
            raise InputError(manifest, f"--preview-masks {', '.join(unknown)}: not among the {len(ids)} training "
                                       f"rows (e.g. {', '.join(ids[:3])}); name training case IDs",
                             kind="unknown-case")
        return list(dict.fromkeys(settings.case_ids))
    picks = np.linspace(0, len(ids) - 1, min(settings.n_masks, len(ids))).round().astype(int)
    return [ids[i] for i in dict.fromkeys(picks.tolist())]


class Previews:
    """The previews of one training run: the chosen masks read once, then after_step(run) after every step."""

    def __init__(self, settings: PreviewConfig, manifest: str | Path, cfg: MedDDPMConfig, rows: pd.DataFrame,
                 out: str | Path, on_write: Callable[[Path, int, int], None] | None = None):
        from .data import load_items
        from .schedulers import make_sampler

        self.settings, self.cfg, self.on_write = settings, cfg, on_write
        self.folder = Path(out) / PREVIEW_DIR
        self.case_ids = preview_cases(manifest, rows, settings)
        chosen = rows[rows["case_id"].astype(str).isin(self.case_ids)]
        by_id = {str(it["case_id"]): it for it in load_items(manifest, cfg, chosen, get_profile(cfg.profile).shape)}
        self.items = [by_id[c] for c in self.case_ids]
        self.sampler = make_sampler("ddim", cfg.timesteps, cfg.schedule, eta=0.0, spacing="leading")
        from cohort.phantom import COHORT_NAME

        self.simulated = "cohort" in rows and bool((chosen["cohort"].astype(str) == COHORT_NAME).any())

    def after_step(self, run) -> Path | None:
        """A preview if run.step is due (synth.train._train_steps calls it on rank 0 after every step)."""
        if not self.settings.due(run.step, run.cfg.steps):
            return None
        return self.write(run.ema, run.step, run.cfg.steps, run.log_rows or [])

    def samples(self, ema: torch.nn.Module) -> list[torch.Tensor]:
        """One sample per mask, (C, X, Y, Z) in [-1, 1], from ``ema`` with the masks' fixed seeds. On the CPU the
        masks go through the network as one batch (a demo forward pass of batch 1 took as long as one of batch 3
        there, measured); elsewhere one at a time, so that a preview at paper size needs the memory of one volume."""
        from .schedulers import sample

        cfg, s = self.cfg, self.settings
        conds = torch.stack([torch.as_tensor(it["condition"]) for it in self.items])
        seeds = [s.seed + i for i in range(len(self.items))]
        on_cpu = next(ema.parameters()).device.type == "cpu"
        groups = [range(len(seeds))] if on_cpu else [[i] for i in range(len(seeds))]
        return [x for g in groups for x in sample(ema, self.sampler, conds[list(g)], cfg.out_channels,
                                                  s.sampling_steps, [seeds[i] for i in g],
                                                  channels_last=cfg.channels_last, prediction=cfg.prediction)]

    def write(self, ema: torch.nn.Module, step: int, total: int, log_rows: list[dict]) -> Path:
        """Sample, draw, and write previews/step_<step>.png and previews/latest.png atomically; the step's file."""
        fig = self.figure(self.samples(ema), step, total, log_rows)
        path = self.folder / f"step_{step:06d}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        import matplotlib.pyplot as plt

        plt.close(fig)
        atomic_write_bytes(self.folder / LATEST, path.read_bytes())
        if self.on_write is not None:
            self.on_write(path, step, total)
        return path

    def figure(self, samples: list[torch.Tensor], step: int, total: int, log_rows: list[dict]):
        """Rows: the masks; columns: the mask's labels, then per modality its real image and the sample; below:
        the loss curve. Axial slice through the tumour's centre; real and sample share the [-1, 1] window (both are
        the network's scale: the real image min-max scaled per modality as in training)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from .train import draw_loss_curve

        mods = self.cfg.modalities
        ncols = 1 + 2 * len(mods)
        fig = plt.figure(figsize=(1.5 * ncols, 1.7 * len(samples) + 2.6))
        grid = fig.add_gridspec(len(samples) + 1, ncols, height_ratios=[1.0] * len(samples) + [1.5])
        for r, (item, synthetic) in enumerate(zip(self.items, samples)):
            label = np.asarray(item["label"])[0]
            real = np.asarray(item["image"])
            z = tumour_slice(label)
            ax = fig.add_subplot(grid[r, 0])
            ax.imshow(np.rot90(label[:, :, z]), cmap="viridis", vmin=0, vmax=4, interpolation="nearest")
            ax.set_ylabel(f"{self.case_ids[r]}\nseed {self.settings.seed + r}", fontsize=7)
            _title(ax, r, "mask (labels 0-4)")
            for m, name in enumerate(mods):
                for k, (what, vol) in enumerate((("real", real[m]), ("sample", synthetic[m].numpy()))):
                    ax = fig.add_subplot(grid[r, 1 + 2 * m + k])
                    ax.imshow(np.rot90(vol[:, :, z]), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
                    _title(ax, r, f"{name} {what}")
        ax = fig.add_subplot(grid[len(samples), :])
        if log_rows:
            draw_loss_curve(ax, [int(r["step"]) for r in log_rows], [float(r["loss"]) for r in log_rows])
        note = "; real atlas anatomy with SIMULATED tumours" if self.simulated else ""
        fig.suptitle(f"Med-DDPM preview at step {step} of {total}: EMA weights, DDIM-{self.settings.sampling_steps} "
                     f"(eta 0), the same seeds at every step{note}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.97))
        return fig


def _title(ax, row: int, text: str) -> None:
    if row == 0:
        ax.set_title(text, fontsize=7)
    ax.set_xticks([]), ax.set_yticks([])

"""Training data as MONAI dictionary transforms over manifest rows (cohort reads the NIfTI files)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.transforms import Compose, EnsureTyped, MapTransform, ScaleIntensityd

from core.errors import InputError, ConfigError
from cohort.manifest import load_manifest, read_case, select
from cohort.volume import select_channels

from .config import MedDDPMConfig
from .network import condition_from_label


class LoadManifestCased(MapTransform):
    """{"row": manifest row} -> {"image": (C,X,Y,Z) float32 in config.modalities order, "label": (1,X,Y,Z) uint8,
    "affine": 4x4, "case_id": str}. A thin MONAI-compatible wrapper around cohort.manifest.read_case."""

    def __init__(self, manifest: str | Path, modalities: tuple[str, ...], shape: tuple[int, int, int] | None = None):
        super().__init__(keys=("row",))
        self.manifest = Path(manifest)
        self.modalities = tuple(modalities)
        self.shape = tuple(shape) if shape is not None else None

    def __call__(self, data: dict) -> dict:
        row = data["row"]
        case = read_case(self.manifest, row)
        image = select_channels(case.image, self.modalities, self.manifest, "the model", case_id=case.case_id).data
        if self.shape is not None and case.shape != self.shape:
            raise InputError(self.manifest, f"case {case.case_id}: shape {case.shape} is not the profile's "
                                             f"{self.shape}", kind="shape-mismatch")
        return {"image": image, "label": case.label.data.astype(np.uint8), "affine": case.affine,
                "case_id": case.case_id}


class LabelToConditiond(MapTransform):
    """Add "condition": the one-hot condition channels of the label map (scheme of the config)."""

    def __init__(self, scheme: str, label_key: str = "label", out_key: str = "condition"):
        super().__init__(keys=(label_key,))
        self.scheme, self.label_key, self.out_key = scheme, label_key, out_key

    def __call__(self, data: dict) -> dict:
        d = dict(data)
        d[self.out_key] = condition_from_label(np.asarray(d[self.label_key]), self.scheme)
        return d


def training_transforms(manifest: str | Path, config: MedDDPMConfig, shape=None) -> Compose:
    steps = [LoadManifestCased(manifest, config.modalities, shape)]
    if config.normalise == "minmax":  # the paper: per volume, per modality rescale to [-1, 1]
        steps.append(ScaleIntensityd(keys="image", minv=-1.0, maxv=1.0, channel_wise=True))
    elif config.normalise != "none":
        raise ConfigError(f"unknown normalise mode {config.normalise!r}")
    steps += [LabelToConditiond(config.condition),
              EnsureTyped(keys=("image", "condition"), data_type="tensor", dtype=torch.float32, track_meta=False)]
    return Compose(steps)


def training_rows(manifest: str | Path, config: MedDDPMConfig, splits=None) -> pd.DataFrame:
    df = load_manifest(manifest)
    rows = select(df, source=config.sources, split=splits or config.splits)
    if not len(rows):
        raise InputError(manifest, f"no rows with source in {list(config.sources)} and split in "
                                    f"{list(splits or config.splits)} to train on", kind="empty-cohort")
    return rows.sort_values("case_id")


def training_dataset(manifest: str | Path, config: MedDDPMConfig, rows: pd.DataFrame, shape=None,
                     cache_rate: float | None = None):
    """The rows as a MONAI dataset that reads and transforms a case when it is asked for: a plain Dataset, or a
    CacheDataset holding the first `cache_rate` share of the cases (config.cache_rate by default) in RAM."""
    from monai.data import CacheDataset, Dataset

    data = [{"row": r} for _, r in rows.iterrows()]
    transform = training_transforms(manifest, config, shape)
    rate = config.cache_rate if cache_rate is None else cache_rate
    if rate <= 0:
        return Dataset(data, transform)
    return CacheDataset(data, transform, cache_rate=rate, num_workers=0, progress=False)


def load_items(manifest: str | Path, config: MedDDPMConfig, rows: pd.DataFrame, shape=None) -> list[dict]:
    """Every row loaded and transformed, as a list (small held-out sets and tests; training streams instead)."""
    ds = training_dataset(manifest, config, rows, shape, cache_rate=0.0)
    return [ds[i] for i in range(len(ds))]


def case_loader(dataset, workers: int, **kwargs):
    """A torch DataLoader reading ``dataset`` in ``workers`` processes (0: in this one). Workers start by forkserver
    (spawn where there is none), not fork: training runs inside multithreaded processes (a Prefect flow, a Dask
    worker), where a forked worker can inherit a lock another thread holds and hang. So the dataset and collate_fn
    must pickle, and each worker holds its own copy of a CacheDataset's cached cases."""
    import multiprocessing

    from torch.utils.data import DataLoader

    start = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return DataLoader(dataset, num_workers=workers, multiprocessing_context=start if workers else None, **kwargs)


def collate_pair(items: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, condition) batches of items; the DataLoader's collate_fn (module level: picklable for workers)."""
    return (torch.stack([torch.as_tensor(it["image"]) for it in items]),
            torch.stack([torch.as_tensor(it["condition"]) for it in items]))


def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The case order of an epoch: a function of (seed, epoch) only, so a resumed run sees the same cases."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()


def rank_shard(batch_size: int, grad_accum: int, world: int) -> tuple[int, int]:
    """(micro-batch size, micro-batches per step) of one of `world` ranks sharing each optimizer step's
    batch_size * grad_accum samples equally: the largest micro-batch <= batch_size that divides a rank's share.
    One rank: (batch_size, grad_accum)."""
    per_step = batch_size * grad_accum
    if per_step % world:
        raise ConfigError(f"{world} processes cannot share an optimizer step of batch_size {batch_size} x "
                          f"grad_accum {grad_accum} = {per_step} samples equally; use a number of processes that "
                          f"divides {per_step}")
    share = per_step // world
    micro = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return micro, share // micro


class StepBatchSampler(torch.utils.data.Sampler):
    """Micro-batches of case indices for optimizer steps [start_step, steps) on one rank of `world`.

    The global sample sequence is epoch_order(seed, 0) + epoch_order(seed, 1) + ...; optimizer step s uses its
    samples [s * per_step, (s + 1) * per_step), and rank r takes the r-th contiguous share of them (a
    DistributedSampler that shards each step rather than each epoch), so the union over ranks is the
    single-process step and a resume at any step continues the same sequence."""

    def __init__(self, n_cases: int, seed: int, batch_size: int, grad_accum: int, steps: int, start_step: int = 0,
                 rank: int = 0, world: int = 1):
        self.n, self.seed, self.steps, self.start = n_cases, seed, steps, start_step
        self.per_step = batch_size * grad_accum
        self.micro, self.accum = rank_shard(batch_size, grad_accum, world)
        self.share = self.per_step // world
        self.offset = rank * self.share  # first position of this rank inside a step
        self._epoch = (-1, [])

    def case_index(self, sample: int) -> int:
        epoch = sample // self.n
        if self._epoch[0] != epoch:
            self._epoch = (epoch, epoch_order(self.seed, epoch, self.n))
        return self._epoch[1][sample % self.n]

    def positions(self) -> range:
        """This rank's positions inside a step (0 .. per_step - 1)."""
        return range(self.offset, self.offset + self.share)

    def __iter__(self):
        for step in range(self.start, self.steps):
            first = step * self.per_step + self.offset
            for m in range(self.accum):
                yield [self.case_index(first + m * self.micro + k) for k in range(self.micro)]

    def __len__(self) -> int:
        return max(0, self.steps - self.start) * self.accum

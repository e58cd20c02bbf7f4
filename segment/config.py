"""SegmenterConfig: one dataclass for both back ends; unset fields take the profile's defaults."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import InputError, ConfigError
from core.identity import content_hash

# The back-end registry: name -> module with train(manifest, train_ids, val_ids, model_dir, cfg) -> model_dir and
# predict(model_dir, manifest, case_ids, out_dir) -> {case_id: path}; imported only when used (segment.api.backend)
BACKEND_MODULES = {"monai": "segment.monai_backend", "nnunet": "segment.nnunet_backend"}
BACKENDS = tuple(BACKEND_MODULES)
SEG_PROFILES = ("tiny", "demo", "paper")
NETWORKS = ("segresnet", "dynunet")  # MONAI back end only
AUGMENTATIONS = ("light", "nnunet")  # MONAI back end only (segment.monai_backend.train_transforms)
# the MONAI network per profile. demo: DynUNet, because SegResNet (8 filters) collapsed the tumour core and the
# enhancing tumour into edema in 2 of 3 seeds even with 400 steps (TC = ET = 0; docs/decisions/0006-segmenter-recipe.md)
DEFAULT_NETWORK = {"tiny": "segresnet", "demo": "dynunet", "paper": "segresnet"}

# Small volumes train with ONE torch thread: their convolutions gain little from a second thread, and when
# several jobs share the 2 cores (parallel study runs, tests) OpenMP spin-waiting made a 2-thread step 12x slower
# (0.18 s vs 2.1 s wall per tiny SegResNet step, measured under load). paper: torch's default (all cores).
# Budget per (backend, profile). An "epoch" is a fixed number of optimiser steps (as in nnU-Net), not one pass
# over the training cases: every mix of a ratio sweep then gets the same number of gradient steps, whatever its size.
PROFILE_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "monai": {
        # seconds on 2 cores: unit tests only
        "tiny": dict(epochs=20, iters_per_epoch=6, batch_size=2, lr=3e-3, patience=100, min_epochs=0, init_filters=8,
                     blocks_down=(1, 1, 1), blocks_up=(1, 1), patch_size=None, num_threads=1, val_every=1,
                     augment="light", ema_decay=0.0),
        # ~2.5 min per training on one core at 32x40x32 (DynUNet, the demo's default network). 400 steps without
        # early stopping (validation every 5 epochs keeps the best): with 200 steps and patience 5 the tumour core
        # and enhancing tumour were not learnt (TC/ET 0.28/0.19 in the default study); at 300 steps they were, but
        # the validation Dice was still rising at the last epoch in 16 of 18 study trainings and one training
        # landed anywhere between TC 0.60 and 0.86 (docs/decisions/0006-segmenter-recipe.md)
        "demo": dict(epochs=40, iters_per_epoch=10, batch_size=2, lr=3e-3, patience=100, min_epochs=10,
                     init_filters=8, blocks_down=(1, 1, 2, 2), blocks_up=(1, 1, 1), patch_size=None, num_threads=1,
                     val_every=5, augment="light", ema_decay=0.0),
        # BraTS-size: SegResNet as in MONAI's BraTS tutorial, 128^3 patches; shape-checked, not trained here
        "paper": dict(epochs=300, iters_per_epoch=250, batch_size=2, lr=1e-3, patience=50, min_epochs=100,
                      init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), patch_size=(128, 128, 128),
                      val_every=1, augment="light", ema_decay=0.0),
    },
    "nnunet": {  # budget from NNUNET_BUDGETS below (the trainer class carries it into nnU-Net)
        "tiny": dict(num_threads=1),
        "demo": dict(num_threads=1),
        "paper": dict(),
    },
}
# nnU-Net's budget per profile, stated once: the trainer classes in segment/nnunet_trainers/ read their numbers from
# here (in nnU-Net's child process), and the config's trainer/epochs/iters_per_epoch are filled from it.
NNUNET_BUDGETS: dict[str, dict[str, Any]] = {
    "tiny": dict(trainer="nnUNetTrainer_segtiny", epochs=4, iters_per_epoch=12, val_iters_per_epoch=2),  # unit tests
    "demo": dict(trainer="nnUNetTrainer_segdemo", epochs=10, iters_per_epoch=25, val_iters_per_epoch=5),  # CPU demo
    "paper": dict(trainer="nnUNetTrainer", epochs=1000, iters_per_epoch=250, val_iters_per_epoch=50),  # nnU-Net's own
}
for _profile, _budget in NNUNET_BUDGETS.items():
    PROFILE_DEFAULTS["nnunet"][_profile].update(trainer=_budget["trainer"], epochs=_budget["epochs"],
                                                iters_per_epoch=_budget["iters_per_epoch"])
# Network-specific defaults (MONAI back end), applied before the profile's. DynUNet (nnU-Net-like, concatenating
# skips) needs 16 base filters at demo: with 8 it learnt no tumour in 300 steps on the phantom (docs/segment.md).
NETWORK_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "segresnet": {},
    "dynunet": {"tiny": dict(init_filters=8), "demo": dict(init_filters=16), "paper": dict(init_filters=32)},
}


# where a training runs does not change what it learns: a run started on the CPU may be resumed on a GPU; nor does
# where the initial weights lie (init_from): their sha256 (init_sha256) is what identifies them
RUNTIME_FIELDS = ("device", "init_from")
# fields added after segmenters were trained and hashed, with the values that train as before the field existed:
# left out of to_dict() (config.json) and identity() at those values, so existing model folders keep their hash
# and resume (as flows.plan leaves such fields out of study_key)
ADDED_FIELD_DEFAULTS: dict[str, tuple[Any, ...]] = {"ema_decay": (None, 0.0), "init_from": (None,),
                                                    "init_sha256": (None,)}


@dataclass(frozen=True)
class SegmenterConfig:
    """What to train. Fields left as None are filled from PROFILE_DEFAULTS[backend][profile] by resolved(), which
    returns a new config (like every change: dataclasses.replace).

    val_ids: validation cases (must be source=real). None = the manifest's real rows with split=val that are not
    training cases. Validation drives early stopping (MONAI) and nnU-Net's fold-0 validation split.
    """

    backend: str = "monai"
    profile: str = "demo"
    seed: int = 0
    epochs: int | None = None
    iters_per_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    patience: int | None = None          # epochs without a better validation Dice before stopping
    min_epochs: int | None = None        # never stop before this epoch (early validation Dice is noisy)
    val_every: int | None = None       # validate every N epochs (and on the last)
    val_ids: list[str] | None = None
    modalities: list[str] | None = None  # None = every modality all training cases have, in MODALITIES order
    init_filters: int | None = None
    blocks_down: tuple[int, ...] | None = None
    blocks_up: tuple[int, ...] | None = None
    patch_size: tuple[int, int, int] | None = None
    augment: str | None = None           # MONAI back end: "light" | "nnunet" (AUGMENTATIONS); profile default
    ema_decay: float | None = None       # MONAI back end: exponential moving average of the weights per step (0 = off)
    trainer: str | None = None           # nnU-Net trainer class name
    network: str | None = None           # MONAI back end: "segresnet" or "dynunet" (default: DEFAULT_NETWORK)
    num_threads: int | None = None       # torch threads in train/predict (restored afterwards); profile default
    device: str = "auto"                 # auto (CUDA when present) | cpu | cuda | cuda:N | mps; not part of identity()
    # fine-tuning: the model.safetensors of a finished segmenter (same back end and modalities) whose weights this
    # training starts from, and that file's sha256 (part of identity(); segment.api.train checks the file against it)
    init_from: str | None = None
    init_sha256: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> "SegmenterConfig":
        if self.backend not in BACKENDS:
            raise ConfigError(f"unknown segmenter backend {self.backend!r}; known: {BACKENDS}", kind="bad-config")
        if self.profile not in SEG_PROFILES:
            raise ConfigError(f"unknown segmenter profile {self.profile!r}; known: {SEG_PROFILES}")
        changes = {}  # the unset fields' defaults (the network's before the profile's), then applied at once
        if self.backend == "monai":
            changes["network"] = self.network or DEFAULT_NETWORK[self.profile]
            if changes["network"] not in NETWORKS:
                raise ConfigError(f"unknown MONAI network {changes['network']!r}; known: {NETWORKS}", kind="bad-config")
            changes.update({k: v for k, v in NETWORK_DEFAULTS[changes["network"]].get(self.profile, {}).items()
                            if getattr(self, k) is None})
        changes.update({k: v for k, v in PROFILE_DEFAULTS[self.backend][self.profile].items()
                        if getattr(self, k) is None and k not in changes})
        augment = changes.get("augment", self.augment)
        if self.backend == "monai" and augment not in AUGMENTATIONS:
            raise ConfigError(f"unknown augmentation {augment!r}; known: {AUGMENTATIONS}", kind="bad-config")
        for k in ("blocks_down", "blocks_up", "patch_size"):
            if (v := changes.get(k, getattr(self, k))) is not None:
                changes[k] = tuple(int(x) for x in v)
        if (self.init_from is None) != (self.init_sha256 is None):
            raise ConfigError("init_from and init_sha256 go together: the pretrained model.safetensors and its "
                              "sha256 (segment.api.pretrained_init gives both)")
        return self.replace(**changes)

    def replace(self, **changes) -> "SegmenterConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain data, less ADDED_FIELD_DEFAULTS' fields at their old behaviour's values."""
        d = dataclasses.asdict(self)
        for k in ("blocks_down", "blocks_up", "patch_size"):
            if d[k] is not None:
                d[k] = list(d[k])
        return {k: v for k, v in d.items() if k not in ADDED_FIELD_DEFAULTS or v not in ADDED_FIELD_DEFAULTS[k]}

    def identity(self) -> dict[str, Any]:
        """to_dict() without the settings that do not change what is trained (RUNTIME_FIELDS): what a model
        directory's config.json must match for a resume."""
        return {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS}

    def hash(self) -> str:
        """content_hash of identity() (core.identity)."""
        return content_hash(self.identity())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SegmenterConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown SegmenterConfig fields {unknown}", kind="bad-config")
        return cls(**d)


def as_config(config: "SegmenterConfig | dict | None") -> SegmenterConfig:
    """Accept a SegmenterConfig, a plain dict (e.g. from Prefect parameters) or None (MONAI demo)."""
    if config is None:
        return SegmenterConfig().resolved()
    if isinstance(config, dict):
        return SegmenterConfig.from_dict(config).resolved()
    return config.resolved()


def load_config(model_dir: str | Path) -> SegmenterConfig:
    """The resolved SegmenterConfig a model directory was trained with (its config.json)."""
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise InputError(p, "missing: not a segmenter model directory", kind="missing-file")
    return SegmenterConfig.from_dict(json.loads(p.read_text())["config"]).resolved()

"""Med-DDPM configuration: network, diffusion and training settings, with one named profile per use.

Profiles: ``tiny`` (unit tests), ``demo`` (the CPU demo study), ``paper-wholehead`` and ``paper-brats`` (the
paper's two models; shape-checked here, not trained), ``authors-brats`` and ``authors-wholehead`` (the authors'
own network, for their published weights: synth.authors_weights). Deliberate differences from the paper:
docs/medddpm.md.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from core.errors import ConfigError
from core.identity import content_hash
from cohort.labels import BRAIN, ED, ET, NCR, TUMOUR_LABELS

# Conditioning schemes: the one-hot channels built from a label map (values {0, 1}).
# brats: [NCR, ED, ET, brain] as the paper's BraTS model; wholehead: [head, tumour] as the whole-head model
# (head = non-tumour head/brain voxels, tumour = any tumour label; exclusive like the paper's one-hot).
CONDITION_CHANNELS: dict[str, tuple[str, ...]] = {
    "brats": ("NCR", "ED", "ET", "brain"),
    "wholehead": ("head", "tumour"),
}
CONDITION_LABELS: dict[str, tuple[tuple[int, ...], ...]] = {
    "brats": ((NCR,), (ED,), (ET,), (BRAIN,)),
    "wholehead": ((BRAIN,), TUMOUR_LABELS),
}

# Fields that do not change what is learned (run length, logging, threads, where and in which precision it runs):
# left out of the config hash, so a run can be resumed with more --steps (constant lr) or on another device.
# With lr_schedule="cosine" the lr horizon is `steps`: a resume checks it separately (synth.train).
RUNTIME_FIELDS = ("steps", "checkpoint_every", "log_every", "num_threads", "progress", "device", "precision",
                  "grad_checkpoint", "data_workers", "cache_rate", "deterministic")
LR_SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
ARCHITECTURES = ("monai", "authors")
# Fields added after configs were first hashed: left out of the hash while at their default, so the hashes (and
# resumable runs) of existing configs do not change.
HASH_IF_SET = {"architecture": "monai", "condition_values": "01", "init_from": None, "prediction": "epsilon",
               "min_snr_gamma": None, "snr_weight_floor": None}
PREDICTIONS = ("epsilon", "v")
# Hashed fields that were removed, with the value every earlier config had: kept in the hash for the same reason.
HASH_REMOVED = {"autocast_bf16": False}
# keys of configs written by earlier versions, read as their present meaning
_LEGACY_KEYS = {"autocast_bf16": lambda v: {"precision": "bf16"} if v else {},
                "gradient_checkpointing": lambda v: {"grad_checkpoint": bool(v)}}


@dataclass(frozen=True)
class MedDDPMConfig:
    # data
    profile: str = "demo"                          # cohort profile (voxel grid)
    modalities: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
    condition: str = "brats"                       # key of CONDITION_CHANNELS
    normalise: str = "minmax"                      # per-volume, per-channel rescale to [-1, 1] (paper) | "none"
    # network (MONAI DiffusionModelUNet)
    channels: tuple[int, ...] = (16, 32, 48, 64)
    attention_levels: tuple[bool, ...] = (False, False, False, True)
    num_res_blocks: int = 1
    norm_num_groups: int = 8
    num_head_channels: tuple[int, ...] | None = None  # None: one head per level (head width = level width)
    use_flash_attention: bool = False
    # "monai": MONAI DiffusionModelUNet; "authors": the authors' guided-diffusion-style U-Net (synth.authors_unet),
    # whose published weights `medddpm import-weights` converts. Both use channels / attention_levels /
    # num_res_blocks / norm_num_groups; "authors" always has middle-block attention and one head.
    architecture: str = "monai"
    condition_values: str = "01"                   # "01"; "pm1": the network maps condition channels to {-1, +1}
    init_from: str | None = None                   # generator file whose weights initialise training
    # sha256 (hex) of that file, set where training starts (synth.checkpoint.with_init_sha256): the config hash
    # counts the file by its content, so a run whose checkout moved still resumes
    init_from_sha256: str | None = None
    # diffusion
    timesteps: int = 250
    schedule: str = "cosine"
    # what the network predicts: "epsilon" (the paper) or "v" (√ᾱ·ε − √(1−ᾱ)·x0, Salimans & Ho 2022; the demo
    # profile only, a documented deviation: with ε the x̂0 of the first sampling steps is ε̂'s error amplified
    # by 1/√ᾱ ≈ 5·10³, and a briefly trained network keeps that error to the end, docs/medddpm.md)
    prediction: str = "epsilon"
    loss: str = "l1"                               # l1 (paper) | l2
    # Min-SNR-γ loss weighting (Hang et al. 2023; None = the paper's unweighted loss; the demo profile: 5, a
    # documented deviation): each sample's loss is weighted so that, measured as error of x̂0, timestep t counts
    # min(SNR_t, γ) (l2; its square root with l1). Unweighted ε/v losses spend most of a small network's capacity
    # on the nearly clean timesteps and little on the mid-noise ones where the anatomy is laid down
    # (docs/medddpm.md deviation 13).
    min_snr_gamma: float | None = None
    # lower bound of that x̂0 weight (Salimans & Ho 2022's truncated-SNR weighting max(SNR, 1) is floor 1; None = no
    # floor). Min-SNR alone weights the noisiest timesteps, where a sample's global layout is decided, by SNR ≈ 0,
    # so nothing teaches the network to drop x_t's noise there (docs/medddpm.md deviation 14).
    snr_weight_floor: float | None = None
    # optimisation
    lr: float = 1e-5
    lr_schedule: str = "constant"                  # constant | cosine (to lr_min at `steps`)
    lr_min: float = 0.0
    warmup_steps: int = 0                          # linear warm-up from lr/warmup_steps, before either schedule
    batch_size: int = 1
    grad_accum: int = 2
    ema_decay: float = 0.995
    ema_every: int = 10
    ema_start: int = 2000                          # before this step the EMA is a copy of the model
    seed: int = 0
    sources: tuple[str, ...] = ("real",)           # manifest rows used for training
    splits: tuple[str, ...] = ("train",)
    # speed (docs/decisions/0009-fp32-on-the-cpu.md)
    channels_last: bool = False
    # runtime (not hashed)
    device: str = "auto"                           # auto (CUDA when present) | cpu | cuda | cuda:N | mps
    precision: str = "auto"                        # auto (bf16 autocast on a bf16 GPU, else fp32) | fp32 | bf16 | fp16
    grad_checkpoint: bool = False                  # activation checkpointing (less memory, ~30 % more time)
    steps: int = 100_000
    checkpoint_every: int = 1000
    log_every: int = 1
    num_threads: int | None = None                 # torch threads inside train/sample calls (None: leave as is)
    progress: bool = True
    data_workers: int | None = None                # DataLoader worker processes (None: 0 on CPU, 4 on CUDA)
    cache_rate: float = 0.0                        # share of the cases kept in RAM (0: every case read when used;
                                                   # tiny/demo: 1, their cohorts are a few MB)
    deterministic: bool = False                    # deterministic GPU kernels (core.determinism; slower): a
                                                   # resumed GPU run repeats its loss curve bit for bit, unless
                                                   # torch warns of an op that has none

    def __post_init__(self):
        if self.condition not in CONDITION_CHANNELS:
            raise ConfigError(f"unknown condition scheme {self.condition!r}; known {sorted(CONDITION_CHANNELS)}")
        if len(self.attention_levels) != len(self.channels):
            raise ConfigError("attention_levels needs one entry per level of channels")
        if any(c % self.norm_num_groups for c in self.channels):
            raise ConfigError(f"every channel count {self.channels} must be divisible by "
                              f"norm_num_groups={self.norm_num_groups}")
        if self.loss not in ("l1", "l2"):
            raise ConfigError(f"loss must be 'l1' or 'l2', not {self.loss!r}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"unknown prediction {self.prediction!r}; known {PREDICTIONS}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma must be > 0 (or None for no weighting), not {self.min_snr_gamma}")
        if self.snr_weight_floor is not None and not (self.snr_weight_floor > 0 and (
                self.min_snr_gamma is None or self.snr_weight_floor <= self.min_snr_gamma)):
            raise ConfigError(f"snr_weight_floor must be > 0 and <= min_snr_gamma ({self.min_snr_gamma}), not "
                              f"{self.snr_weight_floor}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"unknown lr_schedule {self.lr_schedule!r}; known {LR_SCHEDULES} (warm-up: "
                              "warmup_steps / --warmup-steps, with either)")
        if not 0 <= self.warmup_steps:
            raise ConfigError(f"warmup_steps must be >= 0, not {self.warmup_steps}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {self.precision!r}; known {PRECISIONS}")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"unknown architecture {self.architecture!r}; known {ARCHITECTURES}")
        if self.condition_values not in ("01", "pm1") or (self.condition_values == "pm1"
                                                           and self.architecture != "authors"):
            raise ConfigError(f"condition_values {self.condition_values!r}: '01', or 'pm1' with the authors "
                              "architecture")
        if not 0.0 <= self.cache_rate <= 1.0:
            raise ConfigError(f"cache_rate must be in [0, 1], not {self.cache_rate}")
        if self.data_workers is not None and self.data_workers < 0:
            raise ConfigError(f"data_workers must be >= 0, not {self.data_workers}")
        if self.init_from_sha256 is not None and not self.init_from:
            raise ConfigError("init_from_sha256 is the sha256 of the init_from file: set init_from with it")

    @property
    def in_channels(self) -> int:
        return len(self.modalities) + len(CONDITION_CHANNELS[self.condition])

    @property
    def out_channels(self) -> int:
        return len(self.modalities)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["init_from_sha256"] is None:  # written only where set: the files of runs without it keep their bytes
            del d["init_from_sha256"]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "MedDDPMConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(known) - set(_LEGACY_KEYS))
        if unknown:
            raise ConfigError(f"unknown Med-DDPM config keys {unknown}")
        kw = {}
        d = dict(d)
        for old, meaning in _LEGACY_KEYS.items():
            if old in d:
                d.update({k: v for k, v in meaning(d.pop(old)).items() if k not in d})
        if d.get("lr_schedule") == "warmup":  # earlier name of a constant lr after warmup_steps
            d["lr_schedule"] = "constant"
        for k, v in d.items():
            kw[k] = tuple(v) if isinstance(v, list) else v
        return cls(**kw)

    def replace(self, **changes) -> "MedDDPMConfig":
        if "init_from" in changes:  # another file: the old one's sha256 no longer names it
            changes.setdefault("init_from_sha256", None)
        return dataclasses.replace(self, **{k: tuple(v) if isinstance(v, list) else v for k, v in changes.items()})

    def identity(self) -> dict:
        """Everything that changes what is learned (runtime fields excluded), as hashed. init_from counts by the
        content of the generator file it names where init_from_sha256 is set (as "sha256:<hex>", the form hashes
        had when hash() read the file, so their values did not change), else by its path."""
        d = {k: v for k, v in self.to_dict().items() if k not in RUNTIME_FIELDS and k != "init_from_sha256"
             and not (k in HASH_IF_SET and v == HASH_IF_SET[k])}
        if d.get("init_from") and self.init_from_sha256:
            d["init_from"] = "sha256:" + self.init_from_sha256
        d.update(HASH_REMOVED)
        return d

    def hash(self) -> str:
        """content_hash of identity() (core.identity): what a resumed run and a generator's metadata are checked
        against."""
        return content_hash(self.identity())


PAPER = dict(channels=(64, 64, 128, 192, 256), attention_levels=(False, False, False, True, False),
             norm_num_groups=32, lr=1e-5, batch_size=1, grad_accum=2, ema_decay=0.995, ema_every=10,
             ema_start=2000, steps=100_000, checkpoint_every=1000, loss="l1")

PROFILES: dict[str, MedDDPMConfig] = {
    # unit tests: 16x20x16 allows two 2x downsamplings (20 = 4*5). Few channels, high lr and a short EMA so that
    # ~300 steps (about 25 s on one quiet core) learn the label -> contrast mapping.
    "tiny": MedDDPMConfig(profile="tiny", channels=(8, 16, 16), attention_levels=(False, False, True),
                          norm_num_groups=8, lr=3e-3, batch_size=2, grad_accum=1, ema_decay=0.9, ema_every=1,
                          ema_start=100, steps=300, checkpoint_every=50, cache_rate=1.0),
    # CPU demo: 32x40x32, three downsamplings (attention at 1/8 like the paper). 8..64 channels keep a training
    # step near 17 GFLOP (batch 2), so ~700 steps fit the demo's ~6 minutes on 2 quiet cores; high lr with cosine
    # decay and a short EMA make those steps enough for the phantom's contrasts. Why fp32: docs/decisions/0009.
    # v-prediction, the L2 loss and Min-SNR-5 weighting floored at 1 (deviations from the paper, demo only): see
    # those fields and docs/medddpm.md deviations 12-14.
    "demo": MedDDPMConfig(profile="demo", channels=(8, 16, 32, 64), attention_levels=(False, False, False, True),
                          norm_num_groups=8, prediction="v", loss="l2", min_snr_gamma=5.0, snr_weight_floor=1.0,
                          lr=2e-3, lr_schedule="cosine",
                          lr_min=2e-4, batch_size=2, grad_accum=1, ema_decay=0.99, ema_every=1, ema_start=200,
                          steps=700, checkpoint_every=100, cache_rate=1.0),
    "paper-wholehead": MedDDPMConfig(profile="paper-wholehead", modalities=("t1",), condition="wholehead",
                                     num_res_blocks=1, **PAPER),
    "paper-brats": MedDDPMConfig(profile="paper-brats", modalities=("t1", "t1ce", "t2", "flair"), condition="brats",
                                 num_res_blocks=2, **PAPER),
    # The authors' published weights (`medddpm import-weights`): their network exactly, with their effective
    # attention (BraTS: middle block only, see docs/medddpm.md) and their preprocessing (cohort profile
    # authors-brats: centre crop/pad + per-volume min-max). Whole-head: their {-1, +1} condition values.
    "authors-brats": MedDDPMConfig(profile="authors-brats", modalities=("t1", "t1ce", "t2", "flair"),
                                   condition="brats", num_res_blocks=2, architecture="authors",
                                   **{**PAPER, "attention_levels": (False,) * 5}),
    "authors-wholehead": MedDDPMConfig(profile="paper-wholehead", modalities=("t1",), condition="wholehead",
                                       num_res_blocks=1, architecture="authors", condition_values="pm1", **PAPER),
}


def get_config(profile: str, **overrides) -> MedDDPMConfig:
    """The named synth profile, with keyword overrides (e.g. steps=200, lr=1e-4)."""
    try:
        base = PROFILES[profile]
    except KeyError:
        raise ConfigError(f"unknown Med-DDPM profile {profile!r}; known {sorted(PROFILES)}",
                          kind="bad-profile") from None
    return base.replace(**{k: v for k, v in overrides.items() if v is not None}) if overrides else base

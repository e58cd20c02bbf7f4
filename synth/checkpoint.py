"""Checkpoints: the resumable training state (torch.save, loaded with weights_only=True) and the generator
(EMA weights as safetensors + config in its metadata), both written atomically; and what a training run takes from
the generator file it starts from (``init_from``): its network settings, its weights and its content hash."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from core.errors import InputError
from core.fsutil import atomic_write_bytes, sha256_file

from .config import MedDDPMConfig
from .network import build_unet

GENERATOR_FILE = "generator.safetensors"
STATE_FILE = "checkpoints/last.pt"
RANGES_FILE = "intensity_ranges.json"
CONFIG_FILE = "config.json"
LOSS_LOG = "loss_log.csv"
SOURCE_META = "source_sha256"  # metadata key marking an imported generator (synth.authors_weights)
# Network fields a fine-tuning run takes from its init_from generator (everything that shapes the state dict or
# the meaning of its inputs/outputs); the recipe (lr, steps, EMA, ...) and the grid stay the training profile's.
NETWORK_FIELDS = ("architecture", "channels", "attention_levels", "num_res_blocks", "norm_num_groups",
                  "num_head_channels", "condition_values", "modalities", "condition", "timesteps", "schedule",
                  "prediction")


def load_state(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise InputError(path, f"unreadable training checkpoint ({type(e).__name__}: {e})", kind="unreadable") from e


def canonical_safetensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with the JSON header's keys sorted. safetensors writes the metadata map in hash order,
    which differs between runs, so two identical models gave files with different bytes (and content hashes).
    The data section and its offsets are untouched; the header is re-serialised (the format allows any order
    and trailing spaces) and padded to 8 bytes."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def save_generator(path: str | Path, model: torch.nn.Module, config: MedDDPMConfig, step: int,
                   extra_meta: dict[str, str] | None = None) -> Path:
    """The EMA weights as safetensors (on the CPU), config in the metadata; same weights -> same bytes.
    extra_meta: further string metadata (e.g. the source file's sha256 of imported weights)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"config": config.to_json(), "config_hash": config.hash(), "step": str(step), "format": "medddpm-ema-v1",
            **(extra_meta or {})}
    atomic_write_bytes(path, canonical_safetensors(tensors, meta))
    return Path(path)


def resolve_generator(checkpoint: str | Path) -> Path:
    """Accept the generator file itself or the training output folder holding it."""
    p = Path(checkpoint)
    if p.is_dir():
        p = p / GENERATOR_FILE
    if not p.exists():
        raise InputError(p, "Med-DDPM generator checkpoint does not exist", kind="missing-file")
    return p


def load_generator(checkpoint: str | Path) -> tuple[torch.nn.Module, MedDDPMConfig, dict]:
    """(model with EMA weights in eval mode, its config, safetensors metadata)."""
    p = resolve_generator(checkpoint)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
        weights = load_file(str(p))
    except Exception as e:
        raise InputError(p, f"not a readable safetensors generator ({type(e).__name__}: {e})",
                          kind="unreadable") from e
    if "config" not in meta:
        raise InputError(p, "safetensors file has no Med-DDPM config in its metadata", kind="bad-checkpoint")
    config = MedDDPMConfig.from_dict(json.loads(meta["config"]))
    model = build_unet(config)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise InputError(p, f"weights do not fit the stored config ({e})", kind="bad-checkpoint") from e
    model.eval()
    return model, config, meta


def adopt_init_network(cfg: MedDDPMConfig) -> MedDDPMConfig:
    """cfg with its network fields replaced by those of the generator named in cfg.init_from."""
    if not cfg.init_from:
        return cfg
    p = resolve_generator(cfg.init_from)
    try:
        with safe_open(str(p), framework="pt") as f:
            src = MedDDPMConfig.from_dict(json.loads((f.metadata() or {})["config"]))
    except InputError:
        raise
    except Exception as e:
        raise InputError(p, f"not a readable generator to initialise from ({type(e).__name__}: {e})",
                          kind="unreadable") from e
    changes = {k: getattr(src, k) for k in NETWORK_FIELDS if getattr(src, k) != getattr(cfg, k)}
    if changes:
        warnings.warn(f"--init-from {p}: network settings taken from the generator: {sorted(changes)}",
                      stacklevel=2)
    return cfg.replace(**changes)


def with_init_sha256(cfg: MedDDPMConfig) -> MedDDPMConfig:
    """cfg with init_from_sha256 set to the sha256 of the generator file cfg.init_from names (done once, where
    training starts; the config hash counts that file by its content); cfg itself without init_from."""
    if not cfg.init_from:
        return cfg
    return cfg.replace(init_from_sha256=sha256_file(resolve_generator(cfg.init_from)))


def init_weights(model: torch.nn.Module, cfg: MedDDPMConfig) -> None:
    """Load the weights of the generator cfg.init_from names into model."""
    p = resolve_generator(cfg.init_from)
    src, _, _ = load_generator(p)
    try:
        model.load_state_dict(src.state_dict())
    except RuntimeError as e:
        raise InputError(p, f"generator weights do not fit the training network ({str(e)[:300]})",
                          kind="bad-checkpoint") from e

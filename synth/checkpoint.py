"""Checkpoints: the resumable training state (torch.save, loaded with weights_only=True) and the generator
(EMA weights as safetensors + config in its metadata), both written atomically."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from core.errors import InputError
from core.fsutil import atomic_write_bytes

from .config import MedDDPMConfig
from .network import build_unet

GENERATOR_FILE = "generator.safetensors"
STATE_FILE = "checkpoints/last.pt"
RANGES_FILE = "intensity_ranges.json"
CONFIG_FILE = "config.json"
LOSS_LOG = "loss_log.csv"


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

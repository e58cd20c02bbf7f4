"""The interface both segmenter back ends sit behind (called by flows/ and the segment-train/segment-predict verbs).

    train(manifest, case_ids, out_dir, config) -> model_dir
    predict(model_dir, manifest, case_ids, out_dir) -> {case_id: label NIfTI path}

Each back end is a module named in segment.config.BACKEND_MODULES with the same two functions, called after the
checks and records that are common to both. Segmentation target: 0 background, 1 NCR, 2 ED, 3 ET. Brain (cohort
label 4) is not predicted: it is background. MONAI-only functions (load_model, encoder_features) are in
segment.monai_backend.
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType
from typing import Sequence

from core.errors import InputError
from core.fsutil import atomic_write_text, sha256_file
from core.provenance import package_versions

from .config import BACKEND_MODULES, RUNTIME_FIELDS, SegmenterConfig, as_config, load_config
from .data import common_modalities, resolve_case_ids, rows_for, training_data_hash, validation_ids

MODEL_FILES = ("config.json", "training_data.json", "train_log.csv", "model.safetensors")
RECORDED_PACKAGES = ("torch", "monai", "nnunetv2")


# what training, prediction and evaluation import lazily from MONAI
MONAI_MODULES = ("monai.networks.nets", "monai.transforms", "monai.inferers", "monai.losses", "monai.metrics",
                 "monai.apps")


def backend(name: str) -> ModuleType:
    """The back-end module registered under name (imported on first use: nnU-Net is slow to import)."""
    return importlib.import_module(BACKEND_MODULES[name])


def preload(backends: Sequence[str]) -> None:
    """Import the named back ends and MONAI in the calling thread, before trainings and predictions run in threads.
    MONAI's first import is not thread-safe: a second thread importing it meanwhile sees half-initialised modules
    (``cannot import name ... from partially initialized module 'monai.config'``, then ``KeyError: 'monai'``)."""
    for name in MONAI_MODULES:
        importlib.import_module(name)
    for name in backends:
        backend(name)


def is_trained(model_dir: str | Path) -> bool:
    return all((Path(model_dir) / f).exists() for f in (*MODEL_FILES, "training_summary.json"))


def train(manifest: str | Path, case_ids: Sequence[str] | str, out_dir: str | Path,
          config: SegmenterConfig | dict | None = None) -> Path:
    """Train a segmenter on the manifest's case_ids (real and/or synthetic rows, or a split name); returns out_dir.

    Validation cases are always real (config.val_ids, or the manifest's real val-split rows not trained on).
    Rerunning with the same config and data resumes an interrupted run, and returns at once if it finished.
    A model_dir holding a different training (config or data hash) is refused.
    """
    manifest = Path(manifest)
    cfg = as_config(config)
    train_ids = resolve_case_ids(manifest, case_ids)
    if not train_ids:
        raise InputError(manifest, f"no training cases selected by {case_ids!r}", kind="bad-selection")
    rows_for(manifest, train_ids)  # refuses mask-only rows early
    val_ids = validation_ids(manifest, train_ids, cfg.val_ids)
    cfg = cfg.replace(modalities=common_modalities(manifest, train_ids) if cfg.modalities is None else cfg.modalities,
                      val_ids=list(val_ids))
    _refuse_damaged_inputs(manifest, train_ids)
    if cfg.init_from is not None:
        check_pretrained(cfg)
    data_hash, entries = training_data_hash(manifest, train_ids)

    model_dir = Path(out_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    record = {"config": cfg.to_dict(), "train_ids": list(train_ids), "val_ids": list(val_ids),
              "training_data_hash": data_hash, "manifest": str(manifest.resolve()),
              "versions": package_versions(RECORDED_PACKAGES),
              "target_labels": {"0": "background (incl. brain)", "1": "NCR", "2": "ED", "3": "ET"}}
    cfg_path = model_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        old_identity = {k: v for k, v in old.get("config", {}).items() if k not in RUNTIME_FIELDS}
        if old_identity != cfg.identity() or old.get("training_data_hash") != data_hash:
            what = "config" if old_identity != cfg.identity() else "training cases (their files' sha256)"
            raise InputError(cfg_path, f"this model directory holds a training with another {what}, which is kept; "
                                        "train this one into another out_dir (or delete that training first if it "
                                        "is no longer wanted)", kind="model-mismatch")
        if is_trained(model_dir) and _intact_or_cleared(model_dir, cfg):
            return model_dir
    else:
        atomic_write_text(cfg_path, json.dumps(record, indent=2))
    atomic_write_text(model_dir / "training_data.json",
                      json.dumps({"training_data_hash": data_hash, "files": entries}, indent=1))

    backend(cfg.backend).train(manifest, train_ids, val_ids, model_dir, cfg)
    _write_model_record(model_dir)
    return model_dir


def pretrained_init(model_dir: str | Path) -> dict[str, str]:
    """The SegmenterConfig fields that make a training start from a finished segmenter's weights (fine-tuning):
    {"init_from": its model.safetensors, "init_sha256": that file's sha256}."""
    weights = Path(model_dir).resolve() / "model.safetensors"
    if not is_trained(model_dir):
        raise InputError(weights, "not a finished segmenter: train the pre-training run first", kind="missing-file")
    return {"init_from": str(weights), "init_sha256": sha256_file(weights)}


# what must match between a pretrained model and its fine-tuning for the weights to carry over (besides the back
# end): the input channels, and for MONAI the network's architecture
_SAME_AS_PRETRAINED = {"monai": ("modalities", "network", "init_filters", "blocks_down", "blocks_up"),
                       "nnunet": ("modalities",)}


def check_pretrained(cfg: SegmenterConfig) -> None:
    """Refuse (one line naming the file) initial weights that are missing, changed since their sha256 was taken, or
    of a model whose back end, channels or (MONAI) architecture differ from cfg's."""
    weights = Path(cfg.init_from)
    if not weights.exists():
        raise InputError(weights, "missing: the pretrained segmenter's weights (init_from)", kind="missing-file")
    if sha256_file(weights) != cfg.init_sha256:
        raise InputError(weights, f"sha256 differs from init_sha256 {cfg.init_sha256[:12]}...: the pretrained model "
                                  "changed; fine-tune from it again with its new sha256", kind="damaged")
    pre = load_config(weights.parent)
    if pre.backend != cfg.backend:
        raise InputError(weights, f"a {pre.backend} model cannot initialise a {cfg.backend} training",
                         kind="model-mismatch")
    for k in _SAME_AS_PRETRAINED[cfg.backend]:
        if getattr(pre, k) != getattr(cfg, k):
            raise InputError(weights, f"pretrained with {k}={getattr(pre, k)}, this training has "
                                      f"{k}={getattr(cfg, k)}: the weights do not fit; pre-train with the same {k}",
                             kind="model-mismatch")


# sha256 of a finished model's files, written when training ends: a resume that finds the model finished reuses it
# only if they still match (a training run writes the files anew, and ends by writing this record again)
MODEL_RECORD = "model_record.json"
RECORDED_FILES = (*MODEL_FILES, "training_summary.json")


def _write_model_record(model_dir: Path) -> None:
    files = {f: sha256_file(model_dir / f) for f in RECORDED_FILES if (model_dir / f).exists()}
    atomic_write_text(model_dir / MODEL_RECORD, json.dumps({"sha256": files}, indent=1, sort_keys=True) + "\n")


def model_damage(model_dir: str | Path) -> list[tuple[Path, str]]:
    """(file, problem) for each file of a finished model whose sha256 differs from its model record (none
    without a record: a model trained before records existed)."""
    model_dir = Path(model_dir)
    try:
        recorded = json.loads((model_dir / MODEL_RECORD).read_text())["sha256"]
    except (OSError, ValueError, KeyError):
        return []
    out = []
    for f, want in recorded.items():
        p = model_dir / f
        if not p.exists():
            out.append((p, "missing"))
        elif sha256_file(p) != want:
            out.append((p, f"sha256 differs from {model_dir / MODEL_RECORD}"))
    return out


def _intact_or_cleared(model_dir: Path, cfg: SegmenterConfig) -> bool:
    """True if a finished model matches its record. A damaged MONAI model is cleared for training again from
    epoch 0 (seeded: on the same machine the same weights; False); a damaged nnU-Net model is refused, since
    nnU-Net keeps its own checkpoints beside it."""
    damage = model_damage(model_dir)
    if not damage:
        return True
    path, problem = damage[0]
    if cfg.backend != "monai":
        raise InputError(path, f"damaged: {problem}. Delete {model_dir} and rerun the same command to train it "
                               "again", kind="damaged")
    print(f"{path}: {problem}; training this segmenter again", flush=True)
    for f in (*RECORDED_FILES[2:], "resume.pt", MODEL_RECORD):  # keep config.json and training_data.json
        (model_dir / f).unlink(missing_ok=True)
    return False


def _refuse_damaged_inputs(manifest: Path, train_ids: Sequence[str]) -> None:
    """A training case whose file no longer has its manifest sha256 is refused before any comparison with an
    earlier training in model_dir: the damage is upstream, and the message names it (not model_dir)."""
    from cohort.manifest import damaged_files

    from .data import rows_for

    damage = damaged_files(manifest, rows_for(manifest, train_ids))
    if damage:
        cid, path, problem = damage[0]
        raise InputError(path, f"training case {cid}: {problem} ({len(damage)} damaged file(s) in {manifest}); "
                               "rebuild it first: rerun the stage that made it (a study rerun redraws damaged "
                               "synthetic cases)", kind="damaged")


def predict(model_dir: str | Path, manifest: str | Path, case_ids: Sequence[str] | str,
            out_dir: str | Path, device: str | None = None) -> dict[str, Path]:
    """Label NIfTIs (0..3, input affine and shape) for case_ids (ids or a split name) as out_dir/<case_id>.nii.gz.
    device: where to run (auto|cpu|cuda|cuda:N|mps; default: the setting the model was trained with)."""
    model_dir, manifest, out_dir = Path(model_dir), Path(manifest), Path(out_dir)
    if not is_trained(model_dir):
        missing = [f for f in MODEL_FILES if not (model_dir / f).exists()]
        raise InputError(model_dir, "not a finished segmenter model directory (training incomplete or missing files "
                                    f"{missing})", kind="missing-file")
    cfg = load_config(model_dir)
    ids = resolve_case_ids(manifest, case_ids)
    rows_for(manifest, ids)
    out_dir.mkdir(parents=True, exist_ok=True)
    return backend(cfg.backend).predict(model_dir, manifest, ids, out_dir, device=device)

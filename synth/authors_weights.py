"""Import the Med-DDPM authors' published checkpoints (`model_brats.pt`, `model_128.pt`) as our generator.

Their file: ``torch.save({'step', 'model', 'ema'})`` where each state dict is their diffusion wrapper's: the
U-Net under the prefix ``denoise_fn.`` plus the schedule buffers (``betas``, ``alphas_cumprod``, ...).
Import steps:

1. read it with ``torch.load(weights_only=True)``; take ``ema`` (default, what they sample with) or ``model``;
2. check the schedule buffers against ours (T, cosine, ᾱ within ``ALPHA_TOLERANCE``);
3. infer the network size from the keys (base channels, channel widths, blocks per level, attention levels),
   build :class:`synth.authors_unet.AuthorsUNet` and require the key sets and shapes to be equal;
4. **axis order**: they train on (D, W, H) = our (X, Y, Z) reversed. We reverse the spatial axes of every conv
   kernel (``weight.permute(0, 1, 4, 3, 2)``) once here; the network is otherwise symmetric in its spatial axes,
   so it then works directly on our nibabel-order tensors with no permute at run time (fine-tuning and every
   sampler see an ordinary network);
5. **condition channels**: BraTS [NCR, ED, ET, brain] in {0, 1} is our ``brats`` scheme unchanged; whole-head
   [head, tumour] in {-1, +1} is our ``wholehead`` scheme, whose {0, 1} the network maps to {-1, +1} itself
   (``condition_values="pm1"``), so callers keep passing {0, 1};
6. write ``generator.safetensors`` (metadata: config, source file sha256, which weights) and ``config.json``;
   with ``ranges_from`` also the quality gate's ``intensity_ranges.json`` computed from real cases of a manifest
   (preprocessed as the weights expect). Without it synthesis runs ungated and says so.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from core.errors import InputError
from core.fsutil import atomic_write_text, sha256_file

from .checkpoint import CONFIG_FILE, GENERATOR_FILE, RANGES_FILE, SOURCE_META, save_generator
from .config import MedDDPMConfig, get_config
from .network import build_unet

PREFIX = "denoise_fn."
# buffers of their diffusion wrapper (ignored beyond the schedule check: our schedulers recompute them)
SCHEDULE_BUFFERS = frozenset((
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "posterior_mean_coef3"))
ALPHA_TOLERANCE = 1e-5  # |ᾱ_theirs - ᾱ_ours|; fp32 rounding of the same cosine schedule is ~2e-7
FORMATS = {  # --format -> (our synth profile, (in, out) channels of their model, what it is)
    "authors-brats": ("authors-brats", (8, 4), "BraTS model: 4 images + 4 condition channels -> 4"),
    "authors-wholehead": ("authors-wholehead", (3, 1), "whole-head model: 1 image + 2 condition channels -> 1"),
}


def read_authors_checkpoint(path: str | Path, weights: str = "ema") -> tuple[dict, dict, int]:
    """(U-Net state dict without the prefix, schedule buffers, step) from one of their checkpoint files."""
    p = Path(path)
    if weights not in ("ema", "model"):
        raise InputError(p, f"--weights must be 'ema' or 'model', not {weights!r}", kind="bad-config")
    if not p.is_file():
        raise InputError(p, "checkpoint file does not exist", kind="missing-file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupted, not a torch file, or holding non-tensor objects
        raise InputError(p, f"not a readable torch checkpoint ({type(e).__name__}: {str(e)[:200]})",
                          kind="unreadable") from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(weights), dict):
        keys = sorted(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise InputError(p, f"not the authors' Med-DDPM format: no {weights!r} state dict (found {keys})",
                          kind="bad-checkpoint")
    sd = ckpt[weights]
    net = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    if not net:
        raise InputError(p, f"not the authors' Med-DDPM format: no '{PREFIX}*' keys in {weights!r} "
                             "(a checkpoint of another model?)", kind="bad-checkpoint")
    other = {k: v for k, v in sd.items() if not k.startswith(PREFIX)}
    extra = sorted(set(other) - SCHEDULE_BUFFERS)
    if extra:
        raise InputError(p, f"unexpected keys in {weights!r}: {extra[:5]}{' …' if len(extra) > 5 else ''}",
                          kind="bad-checkpoint")
    if not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise InputError(p, f"{weights!r} holds non-tensor values", kind="bad-checkpoint")
    return net, other, int(ckpt.get("step", 0))


def check_schedule(buffers: dict, config: MedDDPMConfig, path: str | Path) -> None:
    """Their stored betas / alphas_cumprod must be our schedule (T steps, cosine) to ALPHA_TOLERANCE."""
    from .schedulers import make_training_scheduler

    missing = [k for k in ("betas", "alphas_cumprod") if k not in buffers]
    if missing:
        raise InputError(path, f"schedule buffers {missing} missing; cannot check the noise schedule",
                          kind="bad-checkpoint")
    ours = make_training_scheduler(config.timesteps, config.schedule)
    ac = buffers["alphas_cumprod"].double().flatten()
    if ac.numel() != config.timesteps:
        raise InputError(path, f"schedule has T = {ac.numel()} steps; ours has T = {config.timesteps}",
                          kind="schedule-mismatch")
    err = float((ac - ours.alphas_cumprod.double()).abs().max())
    if not err <= ALPHA_TOLERANCE:
        raise InputError(path, f"noise schedule differs from ours ({config.schedule}, T = {config.timesteps}): "
                                f"max |Δᾱ| = {err:.3g} > {ALPHA_TOLERANCE:g}", kind="schedule-mismatch")


def infer_network(sd: dict, path: str | Path) -> dict:
    """Network fields (channels, attention_levels, num_res_blocks) and in/out channels from the key layout."""
    try:
        blocks = {int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))}
        n_down = sum(f"input_blocks.{i}.0.op.weight" in sd for i in blocks)
        levels = n_down + 1
        per_level, rest = divmod(len(blocks) - 1 - n_down, levels)
        if rest or per_level < 1:
            raise ValueError(f"{len(blocks)} input blocks with {n_down} downsamplings")
        first = [1 + lv * (per_level + 1) for lv in range(levels)]
        channels = tuple(int(sd[f"input_blocks.{i}.0.in_layers.2.weight"].shape[0]) for i in first)
        attention = tuple(f"input_blocks.{i}.1.qkv.weight" in sd for i in first)
        in_ch = int(sd["input_blocks.0.0.weight"].shape[1])
        out_ch = int(sd["out.2.weight"].shape[0])
        groups = 32 if all(c % 32 == 0 for c in channels) else None
        if groups is None:
            raise ValueError(f"channel widths {channels} are not multiples of 32 (GroupNorm(32))")
    except (KeyError, ValueError, IndexError, AttributeError) as e:
        raise InputError(path, f"not the authors' U-Net layout ({type(e).__name__}: {e})",
                          kind="bad-checkpoint") from e
    return {"channels": channels, "attention_levels": attention, "num_res_blocks": per_level,
            "norm_num_groups": groups, "in_channels": in_ch, "out_channels": out_ch}


def kernels_to_our_axes(sd: dict) -> dict:
    """Reverse the spatial axes of every 3-D conv kernel: (out, in, D, W, H) -> (out, in, H, W, D) = our X, Y, Z.

    The reversal is its own inverse, so the same function exports ours to theirs."""
    return {k: (v.permute(0, 1, 4, 3, 2) if v.ndim == 5 else v).contiguous() for k, v in sd.items()}


def authors_config(fmt: str, sd: dict, path: str | Path, profile: str | None = None) -> MedDDPMConfig:
    """Our config for their checkpoint: the format's profile, with the network size read from the file."""
    if fmt not in FORMATS:
        raise InputError(path, f"unknown format {fmt!r}; known {sorted(FORMATS)}", kind="bad-config")
    synth_profile, (want_in, want_out), what = FORMATS[fmt]
    net = infer_network(sd, path)
    if (net["in_channels"], net["out_channels"]) != (want_in, want_out):
        others = [f for f, (_, io, _) in FORMATS.items() if io == (net["in_channels"], net["out_channels"])]
        hint = f"; it looks like --format {others[0]}" if others else ""
        raise InputError(path, f"the checkpoint maps {net['in_channels']} -> {net['out_channels']} channels, but "
                                f"--format {fmt} is the authors' {what}{hint}", kind="wrong-model")
    cfg = get_config(synth_profile).replace(
        channels=net["channels"], attention_levels=net["attention_levels"], num_res_blocks=net["num_res_blocks"],
        norm_num_groups=net["norm_num_groups"])
    return cfg.replace(profile=profile) if profile else cfg


def load_authors_model(path: str | Path, fmt: str, weights: str = "ema",
                       profile: str | None = None) -> tuple[torch.nn.Module, MedDDPMConfig, int]:
    """(our network in our axis order carrying their weights, its config, their step)."""
    p = Path(path)
    sd, buffers, step = read_authors_checkpoint(p, weights)
    cfg = authors_config(fmt, sd, p, profile)
    check_schedule(buffers, cfg, p)
    model = build_unet(cfg)
    ours = model.state_dict()
    missing, extra = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if missing or extra:
        raise InputError(p, f"state dict does not match the authors' network: missing {missing[:5]}"
                             f"{' …' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                             f"{' …' if len(extra) > 5 else ''}", kind="bad-checkpoint")
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {tuple(v.shape)})" for k, v in ours.items()
             if tuple(sd[k].shape) != tuple(v.shape)]
    if wrong:
        raise InputError(p, f"tensor shapes do not match the authors' network: {wrong[:3]}", kind="bad-checkpoint")
    model.load_state_dict(kernels_to_our_axes(sd))
    return model.eval(), cfg, step


def import_authors_weights(path: str | Path, fmt: str, out_dir: str | Path, weights: str = "ema",
                           profile: str | None = None, ranges_from: str | Path | None = None) -> Path:
    """Convert their checkpoint into out_dir/generator.safetensors (+ config.json, + intensity_ranges.json when
    ``ranges_from`` names a manifest of real cases on the generator's grid); return the generator path.

    profile: cohort profile (voxel grid) the generator is used on; default the format's (authors-brats:
    192x192x144; authors-wholehead: paper-wholehead 128³). The network is fully convolutional, so any grid
    divisible by 16 runs, but the weights were trained on the default one.
    """
    p = Path(path)
    model, cfg, step = load_authors_model(p, fmt, weights, profile)
    source_sha = sha256_file(p)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    provenance = {"source_file": p.name, SOURCE_META: source_sha, "source_format": fmt, "source_weights": weights,
                  "source_step": str(step), "axis_conversion": "conv kernels' spatial axes reversed (D,W,H -> X,Y,Z)"}
    if ranges_from is not None:  # before the generator, so a bad manifest leaves no half-made folder
        write_ranges_from_manifest(ranges_from, cfg, out / RANGES_FILE)
    gen = save_generator(out / GENERATOR_FILE, model, cfg, step, extra_meta=provenance)
    atomic_write_text(out / CONFIG_FILE, json.dumps({**cfg.to_dict(), "config_hash": cfg.hash(),
                                                     "imported_from": str(p.resolve()), **provenance,
                                                     "ranges_from": str(ranges_from) if ranges_from else None},
                                                    indent=1))
    return gen


def write_ranges_from_manifest(manifest: str | Path, cfg: MedDDPMConfig, path: str | Path) -> Path:
    """The quality gate's per-label intensity ranges from the manifest's real training cases (same loading and
    normalisation as training), for a generator that was not trained here."""
    from cohort.profiles import get_profile

    from .data import load_items, training_rows
    from .quality import intensity_ranges, save_ranges

    items = load_items(manifest, cfg, training_rows(manifest, cfg), shape=get_profile(cfg.profile).shape)
    save_ranges(path, intensity_ranges(items, cfg.modalities))
    return Path(path)


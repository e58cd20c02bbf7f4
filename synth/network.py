"""The denoiser (MONAI DiffusionModelUNet configured as Med-DDPM) and the mask -> condition encoding."""
from __future__ import annotations

import numpy as np
import torch

from .config import CONDITION_LABELS, MedDDPMConfig


def build_unet(config: MedDDPMConfig) -> torch.nn.Module:
    """3-D U-Net: input = noisy modalities + one-hot condition channels (concatenated), output = predicted noise.

    One attention head per level (head width = level width), as the paper's single-head attention.
    ``config.architecture == "authors"`` builds the authors' own network instead (synth.authors_unet); both are
    called as ``model(x, t)``. ``config.grad_checkpoint``: activation checkpointing of every block (training only).
    """
    if config.architecture == "authors":
        from .authors_unet import AuthorsUNet

        net = AuthorsUNet(config.in_channels, config.out_channels, tuple(config.channels),
                          tuple(config.attention_levels), config.num_res_blocks, config.norm_num_groups,
                          condition_pm1=config.condition_values == "pm1",
                          gradient_checkpointing=config.grad_checkpoint)
        return net.to(memory_format=torch.channels_last_3d) if config.channels_last else net
    from monai.networks.nets import DiffusionModelUNet

    heads = config.num_head_channels if config.num_head_channels is not None else config.channels
    net = DiffusionModelUNet(
        spatial_dims=3, in_channels=config.in_channels, out_channels=config.out_channels,
        channels=tuple(config.channels), attention_levels=tuple(config.attention_levels),
        num_res_blocks=config.num_res_blocks, norm_num_groups=config.norm_num_groups,
        num_head_channels=tuple(heads), resblock_updown=False, use_flash_attention=config.use_flash_attention)
    if config.grad_checkpoint:  # MONAI's network has no such option: wrap its blocks (synth.grad_checkpoint)
        from .grad_checkpoint import enable_grad_checkpointing

        enable_grad_checkpointing(net)
    if config.channels_last:
        net = net.to(memory_format=torch.channels_last_3d)
    return net


def condition_from_label(label: np.ndarray | torch.Tensor, scheme: str) -> torch.Tensor:
    """One-hot condition (K, X, Y, Z) float32 in {0, 1} from a label map (X, Y, Z) or (1, X, Y, Z)."""
    lab = torch.as_tensor(np.asarray(label)) if not isinstance(label, torch.Tensor) else label
    if lab.ndim == 4:
        lab = lab[0]
    groups = CONDITION_LABELS[scheme]
    if lab.dtype.is_floating_point or lab.dtype == torch.bool or int(lab.min()) < 0:  # not a label map of ints
        chans = [torch.isin(lab, torch.tensor(vals, dtype=lab.dtype)) for vals in groups]
        return torch.stack(chans).to(torch.float32)
    # a lookup table indexed by the label (one gather) instead of one isin per channel: the same {0, 1} values,
    # several times faster, which counts for a few-step sampler's per-volume cost
    size = max(int(lab.max()), *(v for vals in groups for v in vals)) + 1
    table = torch.zeros(len(groups), size, dtype=torch.float32, device=lab.device)
    for c, vals in enumerate(groups):
        table[c, list(vals)] = 1.0
    return table[:, lab.long()]


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

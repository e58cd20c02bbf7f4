"""Activation checkpointing for the denoiser (config ``grad_checkpoint``): the U-Net's blocks recompute their
activations in the backward pass instead of keeping them, trading ~30 % more time for far less memory.

MONAI's DiffusionModelUNet has no such option, so each ResNet block, attention block and upsampler runs under its
own ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the backward pass recomputes one of them at a
time (a whole up block at full resolution would be three ResNet blocks at once). Inside a ResNet block the
recomputation is itself segmented (nested checkpoints): each GroupNorm + SiLU pair and the 1x1 skip convolution
keep only their input, so a recomputed block holds its two convolutions' inputs and not the normalised copies
next to them; in the up blocks the skip is concatenated inside those segments, so the concatenation (a second copy
of the skip at twice the channels) is never kept. At paper-brats (192x192x144, fp32) this takes the counted peak
of a training step from 27.4 to 22.4 GiB (synth.costs). The same operations run in the same order, so outputs
and gradients are those of the plain network. The wrapping is applied in place (the state dict keeps its keys), binds
each forward to its own block (a deep copy, such as the EMA, computes with its own weights) and is active only in
training with gradients enabled, so sampling is unaffected. The authors' network checkpoints its own blocks
(synth.authors_unet).
"""
from __future__ import annotations

import types

import torch
from torch.utils.checkpoint import checkpoint


def _active(block: torch.nn.Module) -> bool:
    return block.training and torch.is_grad_enabled()


def _checkpointed_forward(self: torch.nn.Module, *args, **kwargs):
    """The block's class forward, recomputed in the backward pass."""
    plain = types.MethodType(type(self).forward, self)
    if _active(self):
        return checkpoint(plain, *args, use_reentrant=False, **kwargs)
    return plain(*args, **kwargs)


def _joined(parts: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _norm_act(norm: torch.nn.Module, act: torch.nn.Module, *parts: torch.Tensor) -> torch.Tensor:
    return act(norm(_joined(parts)))


def _skip_path(skip: torch.nn.Module, *parts: torch.Tensor) -> torch.Tensor:
    return skip(_joined(parts))


def _segmented_resnet(block: torch.nn.Module, emb: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
    """MONAI's DiffusionUNetResnetBlock.forward (monai 1.5-1.6; no up/down sampling) on concat(parts), the same
    operations in the same order, with GroupNorm + SiLU and the skip convolution each under a nested checkpoint
    that keeps only its inputs (``parts``: the concatenation happens inside them and is not kept)."""
    h = checkpoint(_norm_act, block.norm1, block.nonlinearity, *parts, use_reentrant=False)
    h = block.conv1(h)
    temb = block.time_emb_proj(block.nonlinearity(emb))
    h = h + temb[(...,) + (None,) * block.spatial_dims]
    h = checkpoint(_norm_act, block.norm2, block.nonlinearity, h, use_reentrant=False)
    h = block.conv2(h)
    if isinstance(block.skip_connection, torch.nn.Identity):
        return _joined(parts) + h
    return checkpoint(_skip_path, block.skip_connection, *parts, use_reentrant=False) + h


def _resnet(block: torch.nn.Module, emb: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
    """block(concat(parts), emb): under a checkpoint whose recomputation is segmented when training."""
    plain = type(block).forward  # the class's, not a wrapped instance forward
    if not _active(block):
        return plain(block, _joined(parts), emb)
    if block.upsample is not None or block.downsample is not None:  # not built by Med-DDPM (resblock_updown False)
        return checkpoint(lambda e, *p: plain(block, _joined(p), e), emb, *parts, use_reentrant=False)
    return checkpoint(_segmented_resnet, block, emb, *parts, use_reentrant=False)


def _resnet_forward(self: torch.nn.Module, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return _resnet(self, emb, x)


def _up_block_forward(self: torch.nn.Module, hidden_states: torch.Tensor, res_hidden_states_list: list[torch.Tensor],
                      temb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """MONAI's UpBlock / AttnUpBlock forward (monai 1.5-1.6) with concat(h, skip) inside each ResNet block's
    checkpoint; its attention blocks and upsampler are checkpointed themselves."""
    del context
    attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
    for resnet, attn in zip(self.resnets, attentions):
        skip, res_hidden_states_list = res_hidden_states_list[-1], res_hidden_states_list[:-1]
        hidden_states = _resnet(resnet, temb, hidden_states, skip)
        if attn is not None:
            hidden_states = attn(hidden_states).contiguous()
    if self.upsampler is not None:
        hidden_states = self.upsampler(hidden_states, temb)
    return hidden_states


def checkpoint_units(net: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks that run under a checkpoint each (recomputed one at a time) when ``net`` is checkpointed."""
    from .authors_unet import AuthorsUNet

    if isinstance(net, AuthorsUNet):
        return [*net.input_blocks, net.middle_block, *net.output_blocks]
    from monai.networks.blocks import SpatialAttentionBlock
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock, WrappedUpsample

    units = (DiffusionUNetResnetBlock, SpatialAttentionBlock, WrappedUpsample)
    return [m for m in net.modules() if isinstance(m, units)]


def enable_grad_checkpointing(net: torch.nn.Module) -> int:
    """Checkpoint each ResNet block, attention block and upsampler of MONAI's U-Net ``net``; returns how many."""
    from monai.networks.nets.diffusion_model_unet import AttnUpBlock, DiffusionUNetResnetBlock, UpBlock

    up_blocks = [b for b in net.modules() if type(b) in (UpBlock, AttnUpBlock)]
    in_up_blocks = {id(r) for b in up_blocks for r in b.resnets}  # checkpointed by their up block, with the concat
    for b in up_blocks:
        b.forward = types.MethodType(_up_block_forward, b)
    units = checkpoint_units(net)
    for m in units:
        if isinstance(m, DiffusionUNetResnetBlock):
            if id(m) not in in_up_blocks:
                m.forward = types.MethodType(_resnet_forward, m)
        else:
            m.forward = types.MethodType(_checkpointed_forward, m)
    return len(units)

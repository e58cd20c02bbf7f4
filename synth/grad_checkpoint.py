"""Activation checkpointing for the denoiser (config ``grad_checkpoint``): the U-Net's blocks recompute their
activations in the backward pass instead of keeping them, trading ~30 % more time for far less memory.

MONAI's DiffusionModelUNet has no such option, so each ResNet block, attention block and upsampler runs under its
own ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: the backward pass recomputes one of them at a
time (a whole up block at full resolution would be three ResNet blocks at once). In the up blocks the skip is
concatenated inside the ResNet block's checkpoint, so the concatenation (a second copy of the skip) is not kept.
The wrapping is applied in place (the state dict keeps its keys), binds each forward to its own block (a deep copy,
such as the EMA, computes with its own weights) and is active only in training with gradients enabled, so sampling
is unaffected. The authors' network checkpoints its own blocks (synth.authors_unet).
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


def _concat_resnet(resnet: torch.nn.Module, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return resnet(torch.cat([h, skip], dim=1), emb)


def _up_block_forward(self: torch.nn.Module, hidden_states: torch.Tensor, res_hidden_states_list: list[torch.Tensor],
                      temb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """MONAI's UpBlock / AttnUpBlock forward (monai 1.5-1.6) with concat(h, skip) inside each ResNet block's
    checkpoint; its attention blocks and upsampler are checkpointed themselves."""
    del context
    attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
    for resnet, attn in zip(self.resnets, attentions):
        skip, res_hidden_states_list = res_hidden_states_list[-1], res_hidden_states_list[:-1]
        if _active(resnet):
            hidden_states = checkpoint(_concat_resnet, resnet, hidden_states, skip, temb, use_reentrant=False)
        else:
            hidden_states = _concat_resnet(resnet, hidden_states, skip, temb)
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
        if not (isinstance(m, DiffusionUNetResnetBlock) and id(m) in in_up_blocks):
            m.forward = types.MethodType(_checkpointed_forward, m)
    return len(units)

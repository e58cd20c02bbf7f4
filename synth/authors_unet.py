"""The Med-DDPM authors' denoiser: the guided-diffusion U-Net in 3-D, written here so that their published weights
load key for key (written from the structure of openai/guided-diffusion, MIT, and the facts listed in
docs/medddpm.md; none of the authors' GPL-3.0 code is used).

Structure (parameter names follow guided-diffusion, which is what makes the state dicts match):
- ``time_embed``: sinusoidal embedding of the raw integer t, width = base channels, max_period 1000, [cos, sin],
  then Linear(base, 4 base) - SiLU - Linear(4 base, 4 base).
- ``input_blocks``: a 3x3x3 conv, then per level ``num_res_blocks`` ResBlocks (+ attention where the level asks for
  it) and, except after the last level, a Downsample (3x3x3 conv, stride 2 on all three axes).
- ``middle_block``: ResBlock, attention, ResBlock.
- ``output_blocks``: per level (deepest first) ``num_res_blocks + 1`` ResBlocks on concat(h, skip) (+ attention)
  and, except at the top level, an Upsample (trilinear x2, then a 3x3x3 conv).
- ``out``: GroupNorm, SiLU, 3x3x3 conv.
ResBlocks add the projected time embedding (no scale-shift); GroupNorm has 32 groups and runs in fp32;
attention is single-head QKV in guided-diffusion's legacy channel order.

Axis order: every operation treats the three spatial axes alike (cubic kernels, equal strides, padding and
scale factors; attention has no positional term), so the network computes the same function in our nibabel order
(X, Y, Z) as in the authors' (D, W, H) = (Z, Y, X) once each conv kernel's spatial axes are reversed.
``synth.authors_weights`` does that at import, so this module never permutes activations.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 1000.0) -> torch.Tensor:
    """(B, dim) sinusoidal embedding of t (raw integer steps): [cos(t f_k), sin(t f_k)], f_k = max_period^(-k/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in fp32 whatever the activation dtype (as the authors' network does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


def _norm(channels: int, groups: int) -> GroupNorm32:
    return GroupNorm32(groups, channels)


class ResBlock(nn.Module):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(_norm(channels, groups), nn.SiLU(),
                                       nn.Conv3d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(_norm(out_channels, groups), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv3d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv3d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all voxels; qkv holds, per head, [q; k; v] stacked (legacy order)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[:2]
        flat = x.reshape(b, c, -1)
        q, k, v = self.qkv(self.norm(flat)).chunk(3, dim=1)  # one head: (B, C, L) each
        # softmax(q^T k / sqrt(C)) v, scaled on both sides as guided-diffusion does (better fp16 range)
        scale = 1.0 / math.sqrt(math.sqrt(c))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        h = torch.einsum("bts,bcs->bct", weight, v)
        return (flat + self.proj_out(h)).reshape(x.shape)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv3d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv3d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="trilinear"))


class TimestepSequential(nn.Sequential):
    """A block of layers; ResBlocks get the time embedding, the others only the activations."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def _concat_run(block: nn.Module, h: torch.Tensor, skip: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    return block(torch.cat([h, skip], dim=1), emb)


class AuthorsUNet(nn.Module):
    """The authors' 3-D U-Net. Called as ``model(x, t)`` like MONAI's DiffusionModelUNet.

    channels: width of each level (the authors': base x (1, 1, 2, 3, 4)); channels[0] is also the time-embedding
    width. attention_levels: per level, whether its ResBlocks are followed by attention (the middle block always
    has it). condition_pm1: the input's condition channels (those after the first ``out_channels``) come in
    {0, 1} and are mapped to {-1, +1} first (the authors' whole-head model was trained on {-1, +1}).
    gradient_checkpointing: recompute each block's activations in the backward pass (saves memory in training).
    """

    def __init__(self, in_channels: int, out_channels: int, channels: tuple[int, ...],
                 attention_levels: tuple[bool, ...], num_res_blocks: int, norm_num_groups: int = 32,
                 condition_pm1: bool = False, gradient_checkpointing: bool = False):
        super().__init__()
        if len(attention_levels) != len(channels):
            raise ValueError("attention_levels needs one entry per level")
        self.out_channels = out_channels
        self.base = channels[0]
        self.condition_pm1 = condition_pm1
        self.gradient_checkpointing = gradient_checkpointing
        emb = 4 * self.base
        g = norm_num_groups
        self.time_embed = nn.Sequential(nn.Linear(self.base, emb), nn.SiLU(), nn.Linear(emb, emb))

        ch = channels[0]
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv3d(in_channels, ch, 3, padding=1))])
        skip_channels = [ch]
        for level, width in enumerate(channels):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, width, g)]
                ch = width
                if attention_levels[level]:
                    layers.append(AttentionBlock(ch, g))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(channels) - 1:
                self.input_blocks.append(TimestepSequential(Downsample(ch)))
                skip_channels.append(ch)

        self.middle_block = TimestepSequential(ResBlock(ch, emb, ch, g), AttentionBlock(ch, g),
                                               ResBlock(ch, emb, ch, g))

        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channels))):
            width = channels[level]
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb, width, g)]
                ch = width
                if attention_levels[level]:
                    layers.append(AttentionBlock(ch, g))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepSequential(*layers))

        self.out = nn.Sequential(_norm(ch, g), nn.SiLU(), nn.Conv3d(ch, out_channels, 3, padding=1))

    def _run(self, fn, *args) -> torch.Tensor:
        """fn(*args), recomputed in the backward pass when checkpointing."""
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return activation_checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.condition_pm1:
            x = torch.cat([x[:, :self.out_channels], 2.0 * x[:, self.out_channels:] - 1.0], dim=1)
        t = torch.as_tensor(timesteps, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.base).to(self.time_embed[0].weight.dtype))
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb)
            skips.append(h)
        h = self._run(self.middle_block, h, emb)
        for block in self.output_blocks:
            # concat(h, skip) inside the checkpoint: outside, it would be kept next to the skip (a second copy)
            h = self._run(_concat_run, block, h, skips.pop(), emb)
        return self.out(h)

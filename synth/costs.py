"""What one Med-DDPM training step and one sampling step cost, counted without running them: the network is
built on PyTorch's meta device (shapes only, no memory, seconds even at 192x192x144) and run under
``torch.utils.flop_counter.FlopCounterMode``; autograd's saved tensors give the activation memory of the backward
pass. ``medddpm plan`` turns these counts into GPU-hours and peak memory per stage (flows/costs.py).

The counts are exact for the network as built (convolutions and matrix products; element-wise work is not
counted), the memory is an estimate: parameters, gradients, Adam moments and the EMA copy in fp32, plus the
saved activations (halved under bf16/fp16 autocast, where convolutions save their inputs in half precision);
with activation checkpointing, what runs outside the checkpointed units plus each unit's inputs, and the largest
unit's activations recomputed during the backward pass. Not counted: gradients in flight and the allocator's
transients, and on CUDA autocast keeps group_norm in fp32 (more than half of fp32 bytes): a lower bound of the real
peak until it is fitted to measured runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from cohort.profiles import get_profile

from .config import MedDDPMConfig

# fp32 weights + gradient + Adam's two moments + the EMA copy, per parameter
TRAIN_BYTES_PER_PARAM = 4 + 4 + 8 + 4


@dataclass(frozen=True)
class StepCost:
    flops: float               # floating-point operations of the step (2 per multiply-add)
    peak_bytes: float          # estimated peak memory of the step
    parameters: int


def _meta_network(cfg: MedDDPMConfig):
    from .network import build_unet

    with torch.device("meta"):
        return build_unet(cfg)


def _shape(cfg: MedDDPMConfig, batch: int):
    return (batch, cfg.in_channels, *get_profile(cfg.profile).shape)


def _counting_saved_bytes(cell: list[int]):
    """saved_tensors_hooks that add the bytes of each tensor autograd saves to cell[0] (and keep the tensor)."""
    def pack(tn):
        cell[0] += tn.numel() * tn.element_size()
        return tn

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda tn: tn)


def forward_backward_cost(net: torch.nn.Module, *inputs: torch.Tensor) -> tuple[float, int]:
    """(FLOPs, bytes of the tensors autograd saves for the backward pass) of one forward + backward of ``net`` on
    ``inputs`` (meta tensors: shapes only). A network returning several outputs (deep supervision) is scored on
    the first."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = [0]
    with FlopCounterMode(display=False) as counter:
        with _counting_saved_bytes(saved):
            out = net(*inputs)
        (out[0] if isinstance(out, (list, tuple)) else out).float().abs().mean().backward()
    return counter.get_total_flops(), saved[0]


def checkpointed_activation_bytes(net: torch.nn.Module, units: list[torch.nn.Module], *inputs: torch.Tensor
                                  ) -> tuple[int, int]:
    """(bytes kept through the forward pass, bytes of the largest unit recomputed in backward) when each of
    ``units`` runs under an activation checkpoint: a unit keeps only its inputs, the rest of the network keeps what
    autograd saves; in backward one unit at a time saves its activations again. Counted on the unwrapped network
    (meta tensors), each unit's saved tensors under a hook of its own."""
    outside, kept_inputs, inside, stack = [0], [0], {}, []

    def enter(module, args, kwargs=None):
        kept_inputs[0] += sum(a.numel() * a.element_size() for a in (*args, *(kwargs or {}).values())
                              if isinstance(a, torch.Tensor))
        inside[id(module)] = [0]
        hooks = _counting_saved_bytes(inside[id(module)])
        hooks.__enter__()
        stack.append(hooks)

    def leave(module, args, output):
        stack.pop().__exit__(None, None, None)

    handles = [h for u in units for h in (u.register_forward_pre_hook(enter, with_kwargs=True),
                                          u.register_forward_hook(leave))]
    try:
        with _counting_saved_bytes(outside):
            net(*inputs)
    finally:
        for h in handles:
            h.remove()
    return outside[0] + kept_inputs[0], max((c[0] for c in inside.values()), default=0)


def train_step_cost(cfg: MedDDPMConfig, *, half_precision: bool = False, grad_checkpoint: bool = False) -> StepCost:
    """One optimizer step: forward + backward of batch_size x grad_accum volumes."""
    net = _meta_network(cfg)
    n_params = sum(p.numel() for p in net.parameters())
    x = torch.zeros(_shape(cfg, cfg.batch_size), device="meta")
    t = torch.zeros(cfg.batch_size, dtype=torch.long, device="meta")
    flops, saved = forward_backward_cost(net, x, t)
    if grad_checkpoint:
        # kept: what runs outside the checkpointed units plus each unit's inputs; recomputed: the largest unit
        from .grad_checkpoint import checkpoint_units

        kept, recomputed = checkpointed_activation_bytes(net, checkpoint_units(net), x, t)
        saved = kept + recomputed
    activations = saved * (0.5 if half_precision else 1.0)
    return StepCost(flops * cfg.grad_accum, n_params * TRAIN_BYTES_PER_PARAM + activations, n_params)


def sample_step_cost(cfg: MedDDPMConfig, batch: int = 1) -> StepCost:
    """One denoising step (a forward pass without gradients) for ``batch`` volumes; peak memory = fp32 weights plus
    the largest layer's input and output plus the attention matrix (what an inference forward holds at once)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = _meta_network(cfg)
    n_params = sum(p.numel() for p in net.parameters())
    x = torch.zeros(_shape(cfg, batch), device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    largest = [0]

    def hook(_m, inputs, output):
        size = sum(v.numel() * v.element_size() for v in (*inputs, output) if isinstance(v, torch.Tensor))
        largest[0] = max(largest[0], size)

    handles = [m.register_forward_hook(hook) for m in net.modules() if not list(m.children())]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t)
    for h in handles:
        h.remove()
    return StepCost(counter.get_total_flops(), n_params * 4 + 2 * largest[0], n_params)

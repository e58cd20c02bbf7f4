"""Activation checkpointing of the denoisers (synth.grad_checkpoint, synth.authors_unet): what runs under one
checkpoint, what is kept for the backward pass, the EMA copy of a checkpointed network, and the plan's memory
estimate under checkpointing (synth.costs)."""
from __future__ import annotations

import copy

import pytest
import torch

import synth.grad_checkpoint as grad_checkpoint
from synth.config import get_config
from synth.costs import train_step_cost
from synth.network import build_unet

# a small authors' network (the authors-brats layout: two ResBlocks per level, no level attention)
SMALL_AUTHORS = dict(architecture="authors", channels=(8, 16, 16), attention_levels=(False, False, False),
                     norm_num_groups=8, num_res_blocks=2)


def _perturbed(net: torch.nn.Module) -> torch.nn.Module:
    """MONAI zero-initialises the last conv of each ResNet block and of the output: without this, most gradients
    of a fresh network are exactly zero and compare equal whatever checkpointing does."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _loss_and_grads(net: torch.nn.Module, x: torch.Tensor, t: torch.Tensor):
    net.zero_grad()
    loss = (net(x, t) - 0.5).square().mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in net.parameters()]


def _assert_same_step(net, ref, x, t):
    loss, grads = _loss_and_grads(net, x, t)
    ref_loss, ref_grads = _loss_and_grads(ref, x, t)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert sum(bool(g.any()) for g in ref_grads) > 0.9 * len(ref_grads)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.slow  # default-suite budget (15 min on 2 cores): CI runs it with -m slow
def test_plan_checkpointing_lowers_the_authors_networks_memory():
    """Checkpointing the authors' network must not raise the plan's peak (it doubled it: the block count of a
    network without MONAI's down_blocks/up_blocks was 1)."""
    cfg = get_config("authors-brats")
    plain = train_step_cost(cfg, half_precision=True)
    ckpt = train_step_cost(cfg, half_precision=True, grad_checkpoint=True)
    assert ckpt.peak_bytes < 0.5 * plain.peak_bytes, (ckpt.peak_bytes / 2 ** 30, plain.peak_bytes / 2 ** 30)


def test_monai_checkpointing_recomputes_one_resnet_or_attention_block_at_a_time(monkeypatch):
    """Each ResNet and attention block of MONAI's U-Net runs under its own checkpoint (not a whole up/down block:
    the top up-block's three full-resolution ResNet blocks were recomputed at once), and a step computes the same
    loss and gradients as without checkpointing."""
    from monai.networks.blocks.spatialattention import SpatialAttentionBlock
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    cfg = get_config("demo")
    torch.manual_seed(0)
    ref = _perturbed(build_unet(cfg).train())
    net = copy.deepcopy(ref)
    grad_checkpoint.enable_grad_checkpointing(net)

    regions, real_checkpoint = [], grad_checkpoint.checkpoint

    def recording_checkpoint(fn, *args, **kwargs):
        def run(*a, **k):
            regions.append(object())
            try:
                return fn(*a, **k)
            finally:
                regions.pop()
        return real_checkpoint(run, *args, **kwargs)

    monkeypatch.setattr(grad_checkpoint, "checkpoint", recording_checkpoint)
    blocks = {name: m for name, m in net.named_modules()
              if isinstance(m, (DiffusionUNetResnetBlock, SpatialAttentionBlock))}
    region_of: dict[str, list] = {}
    # seen from the block's first layer (its norm), which runs inside the block's forward
    handles = [next(m.children()).register_forward_pre_hook(lambda _m, _a, name=name: region_of.setdefault(
        name, []).append(regions[-1] if regions else None)) for name, m in blocks.items()]
    x, t = torch.randn(2, cfg.in_channels, 32, 40, 32), torch.tensor([17, 400])
    out = net(x, t)  # forward only: the recomputation in the backward pass opens regions again
    for h in handles:
        h.remove()
    assert len(blocks) > 10 and set(region_of) == set(blocks)
    firsts = [runs[0] for runs in region_of.values()]
    assert all(r is not None for r in firsts), [n for n, r in zip(region_of, firsts) if r is None]
    assert len({id(r) for r in firsts}) == len(firsts), "two blocks share one checkpoint"
    del out
    monkeypatch.setattr(grad_checkpoint, "checkpoint", real_checkpoint)
    _assert_same_step(net, ref, x, t)
    assert list(net.state_dict()) == list(ref.state_dict())  # checkpointing keeps the keys


def test_monai_checkpointing_keeps_each_skip_once():
    """The skip concatenation of MONAI's up blocks runs inside the ResNet block's checkpoint segments: the
    concatenated tensor (a second copy of the skip) is not kept for the backward pass."""
    from monai.networks.nets.diffusion_model_unet import DiffusionUNetResnetBlock

    cfg = get_config("tiny").replace(grad_checkpoint=True)
    torch.manual_seed(0)
    net = build_unet(cfg).train()
    up_resnets = [m for b in net.up_blocks for m in b.resnets if isinstance(m, DiffusionUNetResnetBlock)]
    # each block's first GroupNorm sees concat(h, skip)
    _assert_concatenations_not_saved(net, [m.norm1 for m in up_resnets], torch.randn(2, cfg.in_channels, 16, 16, 16))


def _assert_concatenations_not_saved(net, resnets, x):
    """The first inputs of ``resnets`` (concat(h, skip)) seen in the forward pass are not among the tensors autograd
    keeps for the backward pass (they are held here so their memory cannot be reused by a kept tensor)."""
    concatenated, saved = [], set()
    handles = [m.register_forward_pre_hook(lambda _m, args: concatenated.append(args[0])) for m in resnets]

    def pack(tn):
        saved.add(tn.untyped_storage().data_ptr())
        return tn

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tn: tn):
        out = net(x, torch.tensor([3, 90]))
    for h in handles:
        h.remove()
    assert len(concatenated) == len(resnets)
    kept = [i for i, c in enumerate(concatenated) if c.untyped_storage().data_ptr() in saved]
    assert not kept, f"concatenated skips kept for the backward pass: {kept}"
    out.square().mean().backward()


def test_authors_checkpointing_keeps_each_skip_once_and_the_same_gradients():
    """The authors' network concatenates (h, skip) inside the output block's checkpoint, so each skip is kept once
    (the concatenation outside it was a second copy of every skip); outputs and gradients are unchanged."""
    cfg = get_config("tiny").replace(**SMALL_AUTHORS)
    torch.manual_seed(0)
    ref = _perturbed(build_unet(cfg).train())
    net = build_unet(cfg.replace(grad_checkpoint=True)).train()
    net.load_state_dict(ref.state_dict())
    x, t = torch.randn(2, cfg.in_channels, 16, 16, 16), torch.tensor([3, 90])
    _assert_concatenations_not_saved(net, [b[0] for b in net.output_blocks], x)
    _assert_same_step(net, ref, x, t)


def test_ema_copy_of_a_checkpointed_network_computes_with_its_own_weights(tmp_path):
    """train._setup's EMA (a deep copy of the checkpointed network): changing only the training network's
    weights leaves ema(x, t) unchanged (a copied closure kept calling the training network's blocks)."""
    from synth.distributed import Ranks
    from synth.train import _setup

    cfg = get_config("tiny").replace(grad_checkpoint=True, device="cpu")
    run = _setup(cfg, tmp_path, torch.device("cpu"), Ranks(), 4, "cases", None)
    x, t = torch.randn(1, cfg.in_channels, 16, 16, 16), torch.tensor([50])
    with torch.no_grad():
        for p in run.net.parameters():  # MONAI zero-initialises the output conv: give the output a say
            p.normal_(0.0, 0.1)
        run.ema.load_state_dict(run.net.state_dict())  # what the EMA update does before ema_start
        before = run.ema(x, t)
        for p in run.net.parameters():
            p.add_(0.1)
        assert not torch.equal(run.net.eval()(x, t), before)
        torch.testing.assert_close(run.ema(x, t), before, rtol=0, atol=0)
    assert list(run.ema.state_dict()) == list(run.net.state_dict())

"""What one Med-DDPM training step and one sampling step cost, counted without running them.

FLOPs: the network is built on PyTorch's meta device (shapes only, seconds even at 192x192x144) and run under
``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products; element-wise work not counted).

Peak memory (docs/decisions/0018-measured-memory-model.md): one step runs on fake tensors under PyTorch's
``MemTracker``, which follows every storage from creation until it is freed, so the peak holds what checkpointed
blocks recompute in backward, gradients in flight, temporaries, weights, gradients and Adam's state; bf16 on a GPU
scales the voxel-dependent part by the saved-bytes ratio counted under CUDA's autocast policy (group_norm and
softmax in fp32; not checked on a GPU), bf16 on a CPU is counted under torch.autocast("cpu") itself; on the CPU
the tracked bytes are calibrated to measured RSS (CPU_RSS_FACTOR, CPU_STEP_OFFSET_BYTES, and for bf16 with
checkpointing CPU_BF16_CHECKPOINT_VOXEL_FACTOR, fitted on reduced-grid steps of ``python -m bench.bench_fullsize``),
plus the process's base memory. ``memory_refusal`` turns the prediction into the one-line refusal of ``train``,
``synthesize`` and ``study``; ``medddpm plan`` prints it per stage and per GPU size (flows/costs.py).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cohort.profiles import get_profile

from .config import MedDDPMConfig

# fp32 weights + gradient + Adam's two moments + the EMA copy, per parameter
TRAIN_BYTES_PER_PARAM = 4 + 4 + 8 + 4


@dataclass(frozen=True)
class StepCost:
    flops: float               # floating-point operations of the step (2 per multiply-add)
    peak: Callable[[], float]  # predicted peak memory of the step (counted when first asked: ~30 s at paper size)
    parameters: int

    @property
    def peak_bytes(self) -> float:
        return self.peak()


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


@dataclass(frozen=True)
class TrackedPeak:
    """Peak bytes of a step as PyTorch's MemTracker counts them on fake tensors, split as at the peak."""

    fixed: int        # parameters, their gradients, the optimizer's state (weights' worth, not voxels')
    voxel: int        # activations, their gradients and temporaries: what grows with the grid and the batch


def _tracked_peak(cfg: MedDDPMConfig, grid: tuple[int, ...], batch: int, train: bool, grad_checkpoint: bool,
                  cpu_autocast: bool = False) -> TrackedPeak:
    """Run one training step (forward, loss, backward, Adam) or one inference forward on fake tensors under
    ``torch.distributed._tools.mem_tracker.MemTracker`` (PyTorch's own memory estimator: every tensor's storage
    from creation until it is freed, so recomputation in checkpoints, gradients in flight and temporaries count).
    ``cpu_autocast``: the training step's forward under torch.autocast("cpu", bfloat16), as `medddpm train
    --precision bf16` runs it on a CPU (torch's own CPU policy runs on fake tensors; CUDA's does not)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from .network import build_unet

    with FakeTensorMode():
        net = build_unet(cfg.replace(grad_checkpoint=grad_checkpoint)).train(train)
        x = torch.randn(batch, cfg.in_channels, *grid)
        t = torch.zeros(batch, dtype=torch.long)
        tracker = MemTracker()
        if train:
            opt = torch.optim.Adam(net.parameters())
            tracker.track_external(net, opt)
            with tracker:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_autocast):
                    out = net(x, t)
                (out.float() - x[:, :cfg.out_channels]).abs().mean().backward()
                opt.step()
        else:
            tracker.track_external(net)
            with tracker, torch.no_grad():
                net(x, t)
        peak = next(iter(tracker.get_tracker_snapshot("peak").values()))
    by = {str(k).rsplit(".", 1)[-1]: v for k, v in peak.items()}
    fixed = by.get("PARAM", 0) + by.get("BUFFER", 0) + by.get("GRAD", 0) + by.get("OPT", 0)
    return TrackedPeak(fixed, by["Total"] - fixed)


_TRACKED: dict = {}


def tracked_peak(cfg: MedDDPMConfig, grid: tuple[int, ...] | None = None, batch: int | None = None, *,
                 train: bool = True, grad_checkpoint: bool = False, cpu_autocast: bool = False) -> TrackedPeak:
    """_tracked_peak, remembered per process (it runs every layer on fake tensors: ~30 s at paper size)."""
    grid = tuple(grid or get_profile(cfg.profile).shape)
    batch = batch or cfg.batch_size
    # what the count depends on: the network, the grid and the batch (not the recipe's grad_accum, steps, ...)
    key = (cfg.replace(grad_checkpoint=False, grad_accum=1, steps=1), grid, batch, train, grad_checkpoint and train,
           cpu_autocast and train)
    if key not in _TRACKED:
        _TRACKED[key] = _tracked_peak(*key)
    return _TRACKED[key]


class _AutocastPolicy(torch.overrides.TorchFunctionMode):
    """bf16 autocast as a torch-function mode, so that it runs on any device's (fake) tensors: the inputs of
    ``lower`` functions are cast to bf16, those of ``fp32`` functions to fp32, the rest run in their inputs' dtype
    (as torch.autocast does; its CUDA policy cannot be run without a GPU)."""

    def __init__(self, fp32: frozenset):
        super().__init__()
        import torch.nn.functional as F

        self.lower = {F.conv1d, F.conv2d, F.conv3d, F.conv_transpose3d, F.linear, torch.matmul, torch.mm, torch.bmm,
                      torch.baddbmm, torch.addmm, torch.einsum, F.scaled_dot_product_attention,
                      torch.Tensor.matmul, torch.Tensor.__matmul__}
        self.fp32 = fp32

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = torch.bfloat16 if func in self.lower else torch.float32 if func in self.fp32 else None
        if dtype is not None:
            cast = lambda v: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v  # noqa: E731
            args = tuple(cast(a) if not isinstance(a, (list, tuple)) else type(a)(map(cast, a)) for a in args)
            kwargs = {k: cast(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _fp32_functions(device_type: str) -> frozenset:
    """What ``device_type``'s autocast runs in fp32 among the functions the denoisers call: on CUDA group_norm,
    layer_norm and softmax (torch's CUDA autocast fp32 list); on the CPU none of them (group_norm and softmax run
    in bf16: the count then reproduces torch.autocast('cpu')'s, tests/test_memory_model.py)."""
    import torch.nn.functional as F

    if device_type != "cuda":
        return frozenset()
    return frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax, F.group_norm, F.layer_norm})


def autocast_activation_ratio(cfg: MedDDPMConfig, device_type: str, grid: tuple[int, ...] = (32, 32, 32)) -> float:
    """Bytes autograd saves in a bf16-autocast forward over those of an fp32 one, counted on fake tensors with
    ``device_type``'s autocast policy (_AutocastPolicy: CUDA keeps group_norm and softmax in fp32, so MONAI's
    ResNet blocks save fp32 norm and SiLU inputs; the CPU runs group_norm in bf16). The same ratio is assumed for
    the gradients and temporaries of the backward pass. Activation bytes are linear in voxels, so a small grid
    gives the ratio at any grid (the attention matrix aside)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .network import build_unet

    key = ("autocast", cfg.replace(grad_checkpoint=False), device_type, grid)
    if key in _TRACKED:
        return _TRACKED[key]
    saved = {}
    for amp in (False, True):
        cell = [0]
        with FakeTensorMode():
            net = build_unet(cfg.replace(grad_checkpoint=False)).train()
            x = torch.randn(1, cfg.in_channels, *grid)
            with _counting_saved_bytes(cell):
                if amp:
                    with _AutocastPolicy(_fp32_functions(device_type)):
                        net(x, torch.zeros(1, dtype=torch.long))
                else:
                    net(x, torch.zeros(1, dtype=torch.long))
        saved[amp] = cell[0]
    _TRACKED[key] = saved[True] / saved[False]
    return _TRACKED[key]


# What the measured peak holds beyond the tracked one, fitted on this machine's CPU by least squares over the
# reduced-grid steps of `python -m bench.bench_fullsize --stages fit` (docs/decisions/0018-measured-memory-model.md):
# RSS rise of a training step = CPU_RSS_FACTOR x tracked bytes + CPU_STEP_OFFSET_BYTES (oneDNN's convolution
# scratch buffers, glibc's arenas). On a GPU max_memory_allocated counts tensors only: factor 1, no offset.
# 2026-12-05: 10 steps (demo 32³-64³ batch 2, paper-brats 32³-64x48x48 batch 1, fp32, with and without
# checkpointing), every one within 5 % of the fit.
CPU_RSS_FACTOR = 1.03
CPU_STEP_OFFSET_BYTES = 0.031 * 2 ** 30
# bf16 on this CPU (2026-12-06, decision 0018): the step is counted under torch.autocast("cpu") itself (so the peak's
# moment is the bf16 step's: at small grids Adam's state, not the activations), and with checkpointing its voxel
# part is scaled by CPU_BF16_CHECKPOINT_VOXEL_FACTOR. There the peak sits inside a full-resolution convolution's
# backward with little else live, and oneDNN's bf16 convolutions (AMX brgconv) copy the NCDHW activations and
# gradients to NDHWC and back inside the call: ~2x the bf16 gradient (fp32's kernels: 1-1.5x the fp32 one), a share
# the tracked tensors do not hold. Fitted (least squares, voxel part only) on paper-brats 96x96x64 and 128x128x96
# bf16 + checkpointing; without checkpointing the saved activations dominate and CPU_RSS_FACTOR alone fits.
CPU_BF16_CHECKPOINT_VOXEL_FACTOR = 1.13
# what a process holds before its first step on a CPU (Python, torch, MONAI imported: measured ~0.9 GiB RSS) or
# on a GPU (the CUDA context and cuDNN/cuBLAS workspaces, outside max_memory_allocated: assumed 1 GiB)
PROCESS_BASE_BYTES = {"cpu": 0.9 * 2 ** 30, "cuda": 1.0 * 2 ** 30}


def predicted_peak_bytes(cfg: MedDDPMConfig, *, train: bool = True, half_precision: bool = False,
                         grad_checkpoint: bool = False, device_type: str = "cuda", batch: int | None = None,
                         grid: tuple[int, ...] | None = None, process: bool = True) -> float:
    """The plan's peak memory of one training step (EMA copy included) or one sampling network evaluation (fp32,
    no autocast, as synth.schedulers.sample runs): the tracked peak (tracked_peak) with its voxel part scaled by
    the autocast ratio under bf16 and by CPU_RSS_FACTOR on the CPU; ``process``: plus what the process holds
    before (PROCESS_BASE_BYTES). bf16 on a CPU: counted under torch.autocast("cpu"), CPU_BF16_CHECKPOINT_VOXEL_FACTOR
    with checkpointing."""
    fixed, voxel = _precision_peak(cfg, grid, batch, train, half_precision, grad_checkpoint, device_type)
    total = fixed + voxel
    if train:  # the EMA copy of the weights (synth.train), outside the tracked step
        total += _n_params(cfg) * 4
    if device_type == "cpu":
        total = CPU_RSS_FACTOR * total + CPU_STEP_OFFSET_BYTES
    return total + (PROCESS_BASE_BYTES[device_type] if process else 0.0)


def predicted_step_rise_bytes(cfg: MedDDPMConfig, *, train: bool = True, half_precision: bool = False,
                              grad_checkpoint: bool = False, device_type: str = "cuda", batch: int | None = None,
                              grid: tuple[int, ...] | None = None) -> float:
    """The model's rise of memory over one step above what is held before it (the weights; no EMA, no process
    base): what bench/bench_fullsize.py measures (RSS rise on a CPU, max_memory_allocated on a GPU)."""
    fixed, voxel = _precision_peak(cfg, grid, batch, train, half_precision, grad_checkpoint, device_type)
    rise = fixed - _n_params(cfg) * 4 + voxel
    return CPU_RSS_FACTOR * rise + CPU_STEP_OFFSET_BYTES if device_type == "cpu" else rise


def _precision_peak(cfg: MedDDPMConfig, grid, batch, train: bool, half_precision: bool, grad_checkpoint: bool,
                    device_type: str) -> tuple[float, float]:
    """(fixed, voxel) bytes of the tracked peak at the step's precision: fp32 as counted; bf16 on a CPU counted
    under torch.autocast("cpu") (voxel part x CPU_BF16_CHECKPOINT_VOXEL_FACTOR with checkpointing); bf16 on a GPU
    the fp32 count with its voxel part scaled by CUDA's autocast ratio (autocast_activation_ratio)."""
    half = half_precision and train
    if half and device_type == "cpu":
        tp = tracked_peak(cfg, grid, batch, train=True, grad_checkpoint=grad_checkpoint, cpu_autocast=True)
        return tp.fixed, tp.voxel * (CPU_BF16_CHECKPOINT_VOXEL_FACTOR if grad_checkpoint else 1.0)
    tp = tracked_peak(cfg, grid, batch, train=train, grad_checkpoint=grad_checkpoint)
    return tp.fixed, tp.voxel * (autocast_activation_ratio(cfg, device_type) if half else 1.0)


def _n_params(cfg: MedDDPMConfig) -> int:
    return sum(p.numel() for p in _meta_network(cfg).parameters())


def train_step_cost(cfg: MedDDPMConfig, *, half_precision: bool = False, grad_checkpoint: bool = False,
                    device_type: str = "cuda") -> StepCost:
    """One optimizer step: forward + backward of batch_size x grad_accum volumes; peak: predicted_peak_bytes."""
    net = _meta_network(cfg)
    n_params = sum(p.numel() for p in net.parameters())
    x = torch.zeros(_shape(cfg, cfg.batch_size), device="meta")
    t = torch.zeros(cfg.batch_size, dtype=torch.long, device="meta")
    flops, _ = forward_backward_cost(net, x, t)
    peak = functools.partial(predicted_peak_bytes, cfg, half_precision=half_precision,
                             grad_checkpoint=grad_checkpoint, device_type=device_type)
    return StepCost(flops * cfg.grad_accum, peak, n_params)


def sample_step_cost(cfg: MedDDPMConfig, batch: int = 1, device_type: str = "cuda") -> StepCost:
    """One denoising step (a forward pass without gradients, fp32) for ``batch`` volumes; peak:
    predicted_peak_bytes of that forward (the skips held across the U included)."""
    from torch.utils.flop_counter import FlopCounterMode

    net = _meta_network(cfg)
    n_params = sum(p.numel() for p in net.parameters())
    x = torch.zeros(_shape(cfg, batch), device="meta")
    t = torch.zeros(batch, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x, t)
    peak = functools.partial(predicted_peak_bytes, cfg, train=False, batch=batch, device_type=device_type)
    return StepCost(counter.get_total_flops(), peak, n_params)


GPU_SIZES_GB = (16, 24, 40, 80)  # the cards `medddpm plan` answers for (decimal GB, as sold)


def device_memory(device) -> tuple[int, str]:
    """(bytes a run may use on ``device``, what that is): the available RAM (psutil) plus what this process holds
    on a CPU, the card's total memory on a GPU."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"{props.name}'s memory"
    import psutil

    # this process's own resident memory (Python, torch) is part of the predicted peak and no longer "available"
    return psutil.virtual_memory().available + psutil.Process().memory_info().rss, "available RAM"


def _quick_upper_bound(cfg: MedDDPMConfig, train: bool, batch: int) -> float:
    """A fast bound above predicted_peak_bytes (meta-device count, ~1 s): fp32 weights, gradient, Adam and EMA plus
    twice what autograd saves in an fp32 forward without checkpointing (the tracked peaks of demo and paper-brats
    steps were 0.87-0.88 of it, sampling's far less), plus the process's base; used to skip the ~30 s tracked
    count when a run fits by far."""
    net = _meta_network(cfg.replace(grad_checkpoint=False))
    n_params = sum(p.numel() for p in net.parameters())
    saved = [0]
    with _counting_saved_bytes(saved):
        net.train()(torch.zeros(_shape(cfg, batch), device="meta"),
                    torch.zeros(batch, dtype=torch.long, device="meta"))
    weights = n_params * (TRAIN_BYTES_PER_PARAM if train else 4)
    return max(CPU_RSS_FACTOR, 1.0) * (weights + 2 * saved[0]) + max(PROCESS_BASE_BYTES.values())


def memory_refusal(cfg: MedDDPMConfig, device, *, train: bool, half_precision: bool = False,
                   grad_checkpoint: bool = False, batch: int | None = None, fp32_only: bool = False,
                   step_name: str = "a training step") -> str | None:
    """None when the plan predicts that the run fits ``device``'s memory (device_memory); else one line with the
    prediction, the device's memory and the choices that would fit (precision, checkpointing, batch). ``train``:
    a training step at cfg.batch_size (batch: micro-batch), else one sampling network evaluation of ``batch``.
    fp32_only: a run with no precision choice (`medddpm distill`), so no bf16 is proposed; ``step_name`` names
    its step."""
    batch = batch or (cfg.batch_size if train else 1)
    limit, what = device_memory(device)
    if _quick_upper_bound(cfg, train, batch) <= limit:
        return None
    dev = device.type if device.type == "cuda" else "cpu"

    def peak(half, ckpt, b):
        return predicted_peak_bytes(cfg, train=train, half_precision=half, grad_checkpoint=ckpt, device_type=dev,
                                    batch=b)

    need = peak(half_precision and train, grad_checkpoint and train, batch)
    if need <= limit:
        return None
    options = []
    batches = sorted({b for b in (batch, 2, 1) if b <= batch}, reverse=True)
    if train:
        for half in ((False, True) if dev == "cuda" and not fp32_only else (False,)):
            for ckpt in (False, True):
                for b in batches:
                    if (half, ckpt, b) != (half_precision, grad_checkpoint, batch) and peak(half, ckpt, b) <= limit:
                        flags = [f for f, on in (("--precision bf16", half), ("--grad-checkpoint", ckpt)) if on]
                        if b != batch:
                            flags.append(f"--batch-size {b} --grad-accum {cfg.grad_accum * batch // b}")
                        gib = peak(half, ckpt, b) / 2 ** 30
                        options.append(f"{' '.join(flags) or '--precision fp32'} ({gib:.2f} GiB)")
                        break
    else:
        for b in batches[1:]:
            if peak(False, False, b) <= limit:
                options.append(f"--batch-size {b} ({peak(False, False, b) / 2 ** 30:.2f} GiB)")
                break
    run = (f"{step_name} ({'bf16' if half_precision else 'fp32'}"
           f"{', checkpointing' if grad_checkpoint else ''}, batch {batch})" if train
           else f"a sampling network evaluation (batch {batch})")
    fits = "; ".join(options) if options else "none of precision, checkpointing or batch (a larger device)"
    return (f"{cfg.profile}: {run} needs about {need / 2 ** 30:.2f} GiB by the plan's memory model, more than the "
            f"{limit / 2 ** 30:.2f} GiB {what}; would fit: {fits}; --force runs it anyway")

"""Noise schedule and samplers, kept apart from the network and the training loop (diffusers / k-diffusion style):
the schedule is a small object, each sampler's update is a stateless function, and ``sample`` runs the loop.

- ``ddpm``: ancestral sampling with the fixed "small" posterior variance (the paper's sampler at n = T = 250).
  With n < T the chain is respaced correctly: each step samples q(x_prev | x_t, x̂0) of the jump t -> t_prev,
  built from ᾱ_t and ᾱ_prev (not from β_t, which belongs to the single step t -> t-1; diffusers PR #2076).
- ``ddim``: DDIM (Song et al. 2021) with eta (0 = deterministic ODE, 1 = the respaced ancestral chain's variance).
- ``dpmpp2m``: DPM-Solver++(2M) (Lu et al. 2022), second-order multistep in log-SNR on the data prediction.
- ``dpmpp2m-sde``: its stochastic form (SDE-DPM-Solver++(2M), midpoint correction, as in k-diffusion's
  ``sample_dpmpp_2m_sde``; the same ``dpmpp2m_update`` with eta > 0) with eta (1 = the reverse SDE, 0 = dpmpp2m):
  fresh noise at every step corrects the variance a few coarse deterministic steps lose.
- ``analytic=True`` (ddpm and ddim): Analytic-DPM's reverse variance (Bao et al. 2022). The samplers above plug a
  point estimate x̂0 = E[x0 | x_t] into q(x_prev | x_t, x0), so each coarse step loses the spread of x0 around it
  and few-step samples come out too smooth (exact denoiser, x0 ~ N(0, 0.3²): DDIM-10 eta 1 has std 0.21).
  The moment-matched step adds c²·Var[x0 | x_t], c being x0's coefficient in the step's mean, with
  Var[x0 | x_t] = (1-ᾱ_t)/ᾱ_t · Γ and Γ = 1 - E|ε̂|²/d. The paper estimates Γ per timestep by Monte Carlo over
  training data; here each sample's own ε̂ estimates it (d ≈ 1.6·10⁵ voxels at the demo grid), so no data or extra
  pass is needed. Var[x0 | x_t] is capped at 1 (x0 lies in [-1, 1]); the final step (to ᾱ = 1) adds no noise.

Every sampler takes its previous timestep from the sampling timesteps themselves and its final step goes to
ᾱ_prev = 1 (the clean image), for every step count n from 1 to T. x̂0 is clamped to [-1, 1] at every step, as the
paper does. MONAI 1.6.1's DDIMScheduler steps back by the fixed stride T // n, which lands on a noisy image when n
does not divide T (n = 20 ends at t = 9), and its DDPMScheduler uses β_t whatever the spacing; neither has
DPM-Solver++. So the updates are written here (a few lines each); the schedule itself (ᾱ) and the training
forward process come from MONAI's DDPMScheduler.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from monai.networks.schedulers import DDPMScheduler

from core.determinism import no_tf32
from core.errors import ConfigError

from . import defaults
from .config import PREDICTIONS

SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "dpmpp2m-sde")
ETA_SAMPLERS = ("ddim", "dpmpp2m-sde")  # the samplers that take eta
ANALYTIC_SAMPLERS = ("ddpm", "ddim")  # the samplers that take Analytic-DPM's variance


def make_training_scheduler(timesteps: int = 250, schedule: str = "cosine") -> DDPMScheduler:
    """The forward process used in training (add_noise).

    MONAI's cosine schedule (s = 0.008, betas clipped at 0.999) equals the paper's.
    """
    return DDPMScheduler(num_train_timesteps=timesteps, schedule=schedule, variance_type="fixed_small",
                         clip_sample=True, prediction_type="epsilon")


@dataclass(frozen=True)
class NoiseSchedule:
    """ᾱ_t for t = 0..T-1 (float64), with ᾱ_{-1} = 1 standing for the clean image."""

    alphas_cumprod: torch.Tensor

    @classmethod
    def build(cls, timesteps: int = 250, schedule: str = "cosine") -> "NoiseSchedule":
        return cls(make_training_scheduler(timesteps, schedule).alphas_cumprod.double().clone())

    @property
    def T(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: int) -> float:
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])


SPACINGS = ("leading", "quadratic", "logsnr")


def sampling_timesteps(T: int, n: int, spacing: str = "leading", schedule: "NoiseSchedule | None" = None) -> list[int]:
    """n distinct timesteps from T-1 downwards; the step after the last one goes to the clean image (ᾱ = 1).

    - leading: evenly spaced by T/n, t_k = round(T-1 - k*T/n). For n dividing T this is MONAI/DDIM's "leading"
      spacing (n = 25: 249, 239, ..., 9); n = T gives every step.
    - quadratic: t_k = round((T-1)(1 - k/(n-1))²), ending at t = 0 (DDIM's "quad" spacing: dense where little
      noise is left, so a few steps do not end on one large jump to the clean image).
    - logsnr: uniform in log-SNR λ = log(√ᾱ/√(1-ᾱ)) from t = T-1 to t = 0 (DPM-Solver's spacing; needs the
      ``schedule``).
    Where rounding makes two timesteps equal, the later one moves one step down (they stay distinct)."""
    n = int(n)
    if not 1 <= n <= T:
        raise ConfigError(f"sampling steps must be between 1 and {T} (the training timesteps), not {n}")
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    if spacing == "leading" or n == 1:
        return [int(math.floor(T - 1 - k * T / n + 0.5)) for k in range(n)]
    if spacing == "quadratic":
        ts = [int(math.floor((T - 1) * (1 - k / (n - 1)) ** 2 + 0.5)) for k in range(n)]
    else:
        if schedule is None:
            raise ConfigError("logsnr spacing needs the noise schedule")
        lam = 0.5 * torch.log(schedule.alphas_cumprod / (1 - schedule.alphas_cumprod))
        targets = torch.linspace(float(lam[T - 1]), float(lam[0]), n, dtype=torch.float64)
        ts = [int(torch.argmin((lam - v).abs())) for v in targets]
    out: list[int] = []
    for k, t in enumerate(ts):  # distinct and descending, leaving room for the steps still to come
        t = min(t, out[-1] - 1) if out else t
        out.append(max(t, n - 1 - k))
    return out


def convert_model_output(output: torch.Tensor, x_t: torch.Tensor, a_t: float,
                         prediction: str = "epsilon") -> tuple[torch.Tensor, torch.Tensor]:
    """The network's output at x_t turned into (ε̂, x̂0), unclamped (diffusers' ``convert_model_output``).

    a_t: ᾱ_t. prediction "epsilon": ε̂ = output, x̂0 = (x_t − √(1−ᾱ)·ε̂)/√ᾱ; "v" (v = √ᾱ·ε − √(1−ᾱ)·x0):
    ε̂ = √ᾱ·v̂ + √(1−ᾱ)·x_t, x̂0 = √ᾱ·x_t − √(1−ᾱ)·v̂. The one place the samplers and probes convert."""
    eps = eps_from_output(output, x_t, a_t, prediction)
    if prediction == "epsilon":
        return eps, (x_t - math.sqrt(1 - a_t) * output) / math.sqrt(a_t)
    return eps, math.sqrt(a_t) * x_t - math.sqrt(1 - a_t) * output


def eps_from_output(output: torch.Tensor, x_t: torch.Tensor, a_t: float, prediction: str = "epsilon") -> torch.Tensor:
    """convert_model_output's ε̂ alone, for a sampler that makes its own (clamped) x̂0 from it: for "epsilon" the
    output itself, with no x̂0 computed and thrown away (three passes over the batch at every step)."""
    if prediction == "epsilon":
        return output
    if prediction == "v":
        return math.sqrt(a_t) * output + math.sqrt(1 - a_t) * x_t
    raise ConfigError(f"unknown prediction {prediction!r}; known {PREDICTIONS}")


def _x0_and_eps(x: torch.Tensor, eps: torch.Tensor, a_t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clamped x̂0 from the ε-prediction, and the ε consistent with the clamped x̂0 (as guided-diffusion does, so
    errors of ε̂ at high noise, where √ᾱ ≈ 0, do not leak into x_prev)."""
    x0 = convert_model_output(eps, x, a_t)[1].clamp(-1.0, 1.0)
    return x0, (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)


def x0_variance(eps: torch.Tensor, a_t: float) -> torch.Tensor:
    """Analytic-DPM's Var[x0 | x_t] per sample, (B, 1, ..., 1): (1-ᾱ_t)/ᾱ_t · (1 - mean(ε̂²)), in [0, 1].

    ``eps`` is the network's ε̂ before clamping x̂0 (1 - mean(ε̂²) estimates the per-voxel Var[ε | x_t])."""
    gamma = (1 - eps.pow(2).flatten(1).mean(1)).clamp(0.0, 1.0)
    return ((1 - a_t) / a_t * gamma).clamp(max=1.0).view(-1, *([1] * (eps.dim() - 1)))


def ddim_update(x, eps, a_t: float, a_prev: float, eta: float, noise=None, analytic: bool = False):
    """One DDIM step t -> t_prev: (x_prev, x̂0). ``noise`` (like x) is needed when a_prev < 1 and eta > 0 or
    ``analytic`` (Analytic-DDIM: c²·Var[x0 | x_t] added to the step's variance, see the module docstring)."""
    raw_eps = eps
    x0, eps = _x0_and_eps(x, eps, a_t)
    var = eta ** 2 * (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    keep = math.sqrt(max(1 - a_prev - var, 0.0))
    out = math.sqrt(a_prev) * x0 + keep * eps
    if analytic and a_prev < 1.0:
        c = math.sqrt(a_prev) - keep * math.sqrt(a_t / (1 - a_t))  # x0's coefficient in the mean, x_t fixed
        return out + (var + c * c * x0_variance(raw_eps, a_t)).sqrt() * noise, x0
    if var > 0:
        out = out + math.sqrt(var) * noise
    return out, x0


def ddpm_update(x, eps, a_t: float, a_prev: float, noise=None, analytic: bool = False):
    """One ancestral step t -> t_prev from the posterior q(x_prev | x_t, x̂0) of that jump: (x_prev, x̂0).

    With β = 1 - ᾱ_t/ᾱ_prev: mean = √ᾱ_prev β/(1-ᾱ_t) x̂0 + √(1-β) (1-ᾱ_prev)/(1-ᾱ_t) x_t,
    variance = β (1-ᾱ_prev)/(1-ᾱ_t) (fixed small). For adjacent steps this is the paper's DDPM. ``analytic``:
    Analytic-DDPM, c²·Var[x0 | x_t] added with c = √ᾱ_prev β/(1-ᾱ_t) (module docstring)."""
    x0, _ = _x0_and_eps(x, eps, a_t)
    beta = 1 - a_t / a_prev
    c = math.sqrt(a_prev) * beta / (1 - a_t)
    mean = c * x0 + (math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)) * x
    var = beta * (1 - a_prev) / (1 - a_t)
    if analytic and a_prev < 1.0:
        return mean + (var + c * c * x0_variance(eps, a_t)).sqrt() * noise, x0
    return (mean + math.sqrt(var) * noise if var > 0 else mean), x0


def dpmpp2m_update(x, eps, a_t: float, a_prev: float, history=None, eta: float = 0.0, noise=None):
    """One DPM-Solver++(2M) step t -> t_prev (eta > 0: its stochastic form, SDE-DPM-Solver++(2M)):
    (x_prev, x̂0, history for the next step). With λ = log(α/σ), h = λ_prev - λ_t:

    x_prev = (σ_prev/σ_t) e^{-ηh} x - α_prev (e^{-(1+η)h} - 1) D + σ_prev √(1 - e^{-2ηh}) z,
    D = (1 + 1/(2r)) x̂0 - 1/(2r) x̂0_last with r = h_last/h; first order (D = x̂0) when there is no history.
    eta = 0 is DPM-Solver++(2M); eta = 1 samples the reverse SDE (k-diffusion's ``sample_dpmpp_2m_sde`` with the
    midpoint correction, written for the VP schedule). ``noise`` is needed when eta > 0 and a_prev < 1. The final
    step (σ_prev = 0) returns x̂0."""
    x0, _ = _x0_and_eps(x, eps, a_t)
    if a_prev >= 1.0:
        return x0, x0, None
    s_t, s_p = math.sqrt(1 - a_t), math.sqrt(1 - a_prev)
    al_t, al_p = math.sqrt(a_t), math.sqrt(a_prev)
    h = math.log(al_p / s_p) - math.log(al_t / s_t)
    d = x0
    if history is not None:
        last_x0, last_h = history
        r = last_h / h
        d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * last_x0
    out = (s_p / s_t) * math.exp(-eta * h) * x - al_p * math.expm1(-(1 + eta) * h) * d
    if eta > 0:
        out = out + s_p * math.sqrt(-math.expm1(-2 * eta * h)) * noise
    return out, x0, (x0, h)


@dataclass(frozen=True)
class Sampler:
    """Which update rule to run (``name`` in SAMPLERS), its eta (ETA_SAMPLERS only) and the noise schedule."""

    name: str
    schedule: NoiseSchedule
    eta: float = 0.0
    spacing: str = "leading"
    analytic: bool = False  # Analytic-DPM's reverse variance (ANALYTIC_SAMPLERS only)
    label_as: str | None = None  # what label() records instead (a distilled student's 'distilled-N')

    @property
    def stochastic(self) -> bool:
        return self.name == "ddpm" or self.analytic or (self.name in ETA_SAMPLERS and self.eta > 0)

    def label(self) -> str:
        """How a manifest records the sampler: 'ddim(eta=1)' for a stochastic eta sampler, else the name;
        'analytic-' in front with Analytic-DPM's variance; a spacing other than leading is appended
        ('dpmpp2m-sde(eta=1)/logsnr', 'analytic-ddim(eta=1)/quadratic')."""
        if self.label_as is not None:
            return self.label_as
        base = f"{self.name}(eta={self.eta:g})" if self.name in ETA_SAMPLERS and self.eta else self.name
        base = f"analytic-{base}" if self.analytic else base
        return base if self.spacing == "leading" else f"{base}/{self.spacing}"

    def timesteps(self, steps: int) -> list[int]:
        return sampling_timesteps(self.schedule.T, steps, self.spacing, self.schedule)


def make_sampler(name: str = defaults.SAMPLER, timesteps: int = 250, schedule: str = "cosine",
                 eta: float = defaults.ETA, spacing: str = defaults.SPACING,
                 analytic: bool = defaults.ANALYTIC) -> Sampler:
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {SAMPLERS}")
    if eta < 0:
        raise ConfigError(f"eta must be >= 0, not {eta}")
    if spacing not in SPACINGS:
        raise ConfigError(f"unknown timestep spacing {spacing!r}; choose one of {SPACINGS}")
    if analytic and name not in ANALYTIC_SAMPLERS:
        raise ConfigError(f"Analytic-DPM's variance is for {ANALYTIC_SAMPLERS}, not {name!r}")
    return Sampler(name, NoiseSchedule.build(timesteps, schedule), float(eta) if name in ETA_SAMPLERS else 0.0,
                   spacing, bool(analytic))


DISTILLED = "distilled"  # synthesize's sampler name for a distilled student (synth.distill); not in SAMPLERS


def distilled_sampler(steps: int, schedule: NoiseSchedule) -> Sampler:
    """How a progressively distilled student samples (synth.distill): DDIM at eta 0 on the leading spacing's
    ``steps`` timesteps, the update its training targets were made with; recorded as 'distilled-<steps>'."""
    sampling_timesteps(schedule.T, steps, "leading")  # refuses a step count outside 1..T
    return Sampler("ddim", schedule, 0.0, "leading", False, label_as=f"{DISTILLED}-{int(steps)}")


def run_sampler(denoise, x: torch.Tensor, sampler: Sampler, steps: int, noise_fn=None,
                start_t: int | None = None) -> torch.Tensor:
    """The sampling loop on a starting noise x: denoise(x, t) -> ε̂; noise_fn() -> a tensor like x (stochastic
    samplers only). Returns x̂ at t = -1 (not clamped; ``sample`` clamps).

    start_t: x is x_{start_t} (e.g. an image noised to start_t with the forward process) and the chain goes on
    from there through its own timesteps below start_t: SDEdit (Meng et al. 2022), diffusers' img2img
    ``strength``. Default: the chain's first timestep, x pure noise."""
    sched = sampler.schedule
    ts = sampler.timesteps(steps)
    if start_t is not None:
        start_t = int(start_t)
        if not 0 <= start_t < sched.T:
            raise ConfigError(f"start_t must be in [0, {sched.T - 1}], not {start_t}")
        ts = [start_t] + [t for t in ts if t < start_t]
    history = None
    for i, t in enumerate(ts):
        a_t, a_prev = sched.alpha_bar(t), sched.alpha_bar(ts[i + 1] if i + 1 < len(ts) else -1)
        eps = denoise(x, t)
        last = a_prev >= 1.0  # the final step adds no noise: draw none, so the noise stream is well defined
        noise = None if last or not sampler.stochastic else noise_fn()
        if sampler.name == "ddim":
            x, _ = ddim_update(x, eps, a_t, a_prev, sampler.eta, noise, sampler.analytic)
        elif sampler.name == "ddpm":
            x, _ = ddpm_update(x, eps, a_t, a_prev, noise, sampler.analytic)
        else:  # dpmpp2m (eta 0, make_sampler) and dpmpp2m-sde
            x, _, history = dpmpp2m_update(x, eps, a_t, a_prev, history, sampler.eta,
                                           None if last or not sampler.eta else noise_fn())
    return x


def model_input(x: torch.Tensor, condition: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """The network's input: noisy image channels, then the one-hot condition channels (Med-DDPM's concat
    conditioning; used by training and sampling alike)."""
    inp = torch.cat([x, condition], dim=1)
    return inp.contiguous(memory_format=torch.channels_last_3d) if channels_last else inp


@torch.no_grad()
def sample(model: torch.nn.Module, sampler: Sampler, condition: torch.Tensor, out_channels: int, steps: int,
           seeds: list[int], *, progress: bool = False, channels_last: bool = False,
           device: torch.device | str | None = None, prediction: str = "epsilon") -> torch.Tensor:
    """Generate one image per condition in a batch; returns (B, out_channels, X, Y, Z) in [-1, 1] on the CPU.

    condition: (B, K, X, Y, Z) one-hot masks; seeds: one per sample. Each sample's starting noise and (for
    stochastic samplers) its per-step noise are drawn on the CPU from its own generator and then moved to the
    model's device, so a sample's noise depends only on its seed (not on batch partners or the device). The network
    runs in float32 with TF32 off (core.determinism.no_tf32, restored afterwards): cuDNN's TF32 convolutions, its
    default on Ampere and newer GPUs, would compound their error over a stochastic chain. The float32 arithmetic
    still rounds differently on another device, library version or batch size, and the chain carries that on:
    a seed repeats its sample on one device and software stack (on a GPU guaranteed only under
    core.determinism.deterministic_algorithms, ``--deterministic``), and gives a close but not identical one
    elsewhere. device: where to run (default: the model's device). prediction: what the network
    predicts (its config's ``prediction``): "epsilon", or "v", turned into ε̂ = √ᾱ·v̂ + √(1−ᾱ)·x_t for the samplers.
    With "v" the chain runs in float64: at t = T−1 (ᾱ ≈ 1e-8) the samplers' x̂0 = (x − √(1−ᾱ)ε̂)/√ᾱ would lose
    every digit of √ᾱ·x_t in float32.
    """
    from tqdm.auto import tqdm

    if len(seeds) != condition.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {condition.shape[0]}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (1, out_channels, *condition.shape[2:])
    draw = lambda: torch.cat([torch.randn(shape, generator=g) for g in gens]).to(device)  # noqa: E731
    if prediction not in PREDICTIONS:
        raise ConfigError(f"unknown prediction {prediction!r}; known {PREDICTIONS}")
    x = draw().double() if prediction == "v" else draw()
    cond = condition.to(device=device, dtype=torch.float32)
    model.eval()
    bar = tqdm(total=steps, desc=f"sampling ({sampler.label()}, {steps} steps)", disable=not progress, leave=False)

    def denoise(x_t, t):
        bar.update(1)
        tt = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=device)
        out = model(model_input(x_t.float(), cond, channels_last), tt).contiguous().to(x_t.dtype)
        return eps_from_output(out, x_t, sampler.schedule.alpha_bar(t), prediction)

    with no_tf32():
        x = run_sampler(denoise, x, sampler, steps, lambda: draw().to(x.dtype))
    bar.close()
    return x.clamp(-1.0, 1.0).float().cpu()

"""Noise schedule and samplers, kept apart from the network (diffusers style).

Every sampler has ``set_timesteps(n)``, ``timesteps`` and ``step(eps, t, x, generator=None) -> (x_prev, x0_hat)``
and clamps x̂0 to [-1, 1] as the paper does.

- ``ddpm``: MONAI's DDPMScheduler (ancestral sampling, fixed "small" posterior variance) over all T steps.
- ``ddim``: MONAI's DDIMScheduler, with timesteps re-spaced so that MONAI's fixed stride ``T // n`` in ``step``
  matches them (MONAI 1.6.1 spaces them by linspace but steps back by T // n; see docs/medddpm.md).
- ``dpmpp2m``: DPM-Solver++(2M) (Lu et al. 2022, data-prediction multistep solver). MONAI has no such
  scheduler and diffusers is not a dependency, so it is written here on top of MONAI's noise schedule.
"""
from __future__ import annotations

import math

import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, Scheduler

SAMPLERS = ("ddpm", "ddim", "dpmpp2m")


def make_training_scheduler(timesteps: int = 250, schedule: str = "cosine") -> DDPMScheduler:
    """The forward process used in training (add_noise) and by ancestral sampling.

    MONAI's cosine schedule (s = 0.008, betas clipped at 0.999) equals the paper's.
    """
    return DDPMScheduler(num_train_timesteps=timesteps, schedule=schedule, variance_type="fixed_small",
                         clip_sample=True, prediction_type="epsilon")


class DDPMSampler(DDPMScheduler):
    """Ancestral DDPM (the paper's sampler). With ``n < T`` MONAI respaces the chain; the paper uses n = T."""

    stochastic = True

    def __init__(self, timesteps: int = 250, schedule: str = "cosine"):
        super().__init__(num_train_timesteps=timesteps, schedule=schedule, variance_type="fixed_small",
                         clip_sample=True, prediction_type="epsilon")


class DDIMSampler(DDIMScheduler):
    """DDIM with eta (0 = deterministic). Timesteps start at T-1 and are evenly spaced by MONAI's stride T // n."""

    def __init__(self, timesteps: int = 250, schedule: str = "cosine", eta: float = 0.0):
        super().__init__(num_train_timesteps=timesteps, schedule=schedule, clip_sample=True,
                         set_alpha_to_one=True, prediction_type="epsilon")
        self.eta = float(eta)

    @property
    def stochastic(self) -> bool:
        return self.eta > 0

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        super().set_timesteps(num_inference_steps, device)  # validates n
        stride = self.num_train_timesteps // num_inference_steps
        last = self.num_train_timesteps - 1
        # t_k = T-1 - k*stride, so that MONAI's step (prev = t - stride) lands exactly on the next timestep
        self.timesteps = torch.arange(last, last - num_inference_steps * stride, -stride, device=device)[
            :num_inference_steps]

    def step(self, model_output, timestep, sample, eta=None, generator=None):
        # Re-derive ε from the clamped x̂0 (as guided-diffusion's DDIM does) so the "direction" term agrees with
        # the clamped estimate; MONAI would keep the raw ε̂, whose errors at high t (a ≈ 0) then leak into x_{t-1}.
        a = self.alphas_cumprod[int(timestep)]
        x0 = ((sample - (1 - a).sqrt() * model_output) / a.sqrt()).clamp(-1.0, 1.0)
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
        return super().step(eps, int(timestep), sample, eta=self.eta if eta is None else eta, generator=generator)


class DPMSolverPP2MSampler(Scheduler):
    """DPM-Solver++(2M): second-order multistep solver in log-SNR time on the data prediction x̂0.

    Hand-written (MONAI has none): x_{i+1} = (σ_{i+1}/σ_i) x_i - α_{i+1}(e^{-h} - 1) D_i with
    D_i = (1 + 1/(2r)) x̂0_i - 1/(2r) x̂0_{i-1}, r = h_{i-1}/h_i; first order on the first and last step.
    The last step lands on the clean image (σ = 0), where the update reduces to x = x̂0.
    """

    stochastic = False

    def __init__(self, timesteps: int = 250, schedule: str = "cosine"):
        super().__init__(num_train_timesteps=timesteps, schedule=schedule)
        self._prev_x0: torch.Tensor | None = None
        self._prev_h: float | None = None

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        if not 1 <= num_inference_steps <= self.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [1, {self.num_train_timesteps}]")
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.linspace(self.num_train_timesteps - 1, 0, num_inference_steps,
                                        device=device).round().long()
        self._prev_x0, self._prev_h = None, None

    def _alpha_sigma(self, t: int) -> tuple[float, float]:
        if t < 0:
            return 1.0, 0.0
        a = float(self.alphas_cumprod[t])
        return math.sqrt(a), math.sqrt(1.0 - a)

    def step(self, model_output, timestep, sample, generator=None):
        steps = self.timesteps.tolist()
        t = int(timestep)
        i = steps.index(t)
        t_next = steps[i + 1] if i + 1 < len(steps) else -1
        a_t, s_t = self._alpha_sigma(t)
        a_n, s_n = self._alpha_sigma(t_next)
        x0 = ((sample - s_t * model_output) / a_t).clamp(-1.0, 1.0)
        if t_next < 0:  # final step to the clean image
            self._prev_x0, self._prev_h = None, None
            return x0, x0
        lam_t, lam_n = math.log(a_t / s_t), math.log(a_n / s_n)
        h = lam_n - lam_t
        if self._prev_x0 is None or self._prev_h is None:
            d = x0
        else:
            r = self._prev_h / h
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * self._prev_x0
        x_next = (s_n / s_t) * sample - a_n * math.expm1(-h) * d
        self._prev_x0, self._prev_h = x0, h
        return x_next, x0


def make_sampler(name: str, timesteps: int = 250, schedule: str = "cosine", eta: float = 0.0):
    if name == "ddpm":
        return DDPMSampler(timesteps, schedule)
    if name == "ddim":
        return DDIMSampler(timesteps, schedule, eta=eta)
    if name == "dpmpp2m":
        return DPMSolverPP2MSampler(timesteps, schedule)
    raise ValueError(f"unknown sampler {name!r}; known {SAMPLERS}")


@torch.no_grad()
def sample(model: torch.nn.Module, sampler, condition: torch.Tensor, out_channels: int, steps: int,
           seeds: list[int], *, progress: bool = False, channels_last: bool = False) -> torch.Tensor:
    """Generate one image per condition in a batch.

    condition: (B, K, X, Y, Z) one-hot masks; seeds: one per sample. Each sample's starting noise and (for
    stochastic samplers) its per-step noise come from its own generator, so a sample depends only on its seed
    and condition, not on what else is in the batch. Returns (B, out_channels, X, Y, Z) in [-1, 1].
    """
    from tqdm.auto import tqdm

    if len(seeds) != condition.shape[0]:
        raise ValueError(f"{len(seeds)} seeds for a batch of {condition.shape[0]}")
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    shape = (1, out_channels, *condition.shape[2:])
    x = torch.cat([torch.randn(shape, generator=g) for g in gens])
    sampler.set_timesteps(steps)
    model.eval()
    for t in tqdm(sampler.timesteps, desc=f"sampling ({type(sampler).__name__})", disable=not progress,
                  leave=False):
        inp = torch.cat([x, condition], dim=1)
        if channels_last:
            inp = inp.contiguous(memory_format=torch.channels_last_3d)
        eps = model(inp, torch.full((x.shape[0],), int(t), dtype=torch.long)).float().contiguous()
        if sampler.stochastic:  # per-sample generators keep samples independent of batch composition
            x = torch.cat([sampler.step(eps[i:i + 1], int(t), x[i:i + 1], generator=gens[i])[0]
                           for i in range(x.shape[0])])
        else:
            x = sampler.step(eps, int(t), x)[0]
    return x.clamp(-1.0, 1.0)

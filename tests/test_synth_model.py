"""Med-DDPM network configuration, condition encoding and samplers (no training needed)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from core.errors import ConfigError
from synth.config import CONDITION_CHANNELS, CONDITION_LABELS, MedDDPMConfig, get_config
from synth.network import build_unet, condition_from_label, count_parameters
from synth.schedulers import make_sampler, make_training_scheduler, run_sampler, sample, sampling_timesteps


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the machine is shared, 2 threads thrash


@pytest.mark.parametrize("profile,in_ch,out_ch,shape", [
    ("paper-wholehead", 3, 1, (128, 128, 128)),
    ("paper-brats", 8, 4, (192, 192, 144)),
])
def test_paper_profiles_have_the_papers_layout_and_full_size_shapes(profile, in_ch, out_ch, shape):
    cfg = get_config(profile)
    assert cfg.channels == (64, 64, 128, 192, 256)  # base 64, multipliers (1, 1, 2, 3, 4)
    assert cfg.attention_levels == (False, False, False, True, False)  # attention at 1/8 resolution
    assert cfg.norm_num_groups == 32 and cfg.timesteps == 250 and cfg.loss == "l1" and cfg.lr == 1e-5
    assert (cfg.ema_decay, cfg.ema_every, cfg.ema_start, cfg.grad_accum) == (0.995, 10, 2000, 2)
    assert (cfg.in_channels, cfg.out_channels) == (in_ch, out_ch)
    # full-size forward on the meta device: checks every shape without allocating 128^3 activations
    with torch.device("meta"):
        net = build_unet(cfg)
        y = net(torch.empty(1, in_ch, *shape), torch.zeros(1, dtype=torch.long))
    assert tuple(y.shape) == (1, out_ch, *shape)
    if profile == "paper-wholehead":  # the recipe's own count for the whole-head model
        assert abs(count_parameters(net) / 1e6 - 40.2) < 0.1


@pytest.mark.parametrize("profile", ["paper-wholehead", "paper-brats"])
def test_paper_profiles_forward_pass_at_reduced_size(profile):
    cfg = get_config(profile)
    torch.manual_seed(0)
    net = build_unet(cfg).eval()
    x = torch.randn(1, cfg.in_channels, 16, 16, 16)  # 16: the smallest grid 4 downsamplings allow
    with torch.no_grad():
        y = net(x, torch.tensor([249]))
    assert y.shape == (1, cfg.out_channels, 16, 16, 16) and torch.isfinite(y).all()


def test_condition_encoding_is_one_hot_in_the_papers_channel_order():
    lab = np.array([0, 1, 2, 3, 4, 4], np.uint8).reshape(1, 1, 6)
    brats = condition_from_label(lab, "brats")
    assert CONDITION_CHANNELS["brats"] == ("NCR", "ED", "ET", "brain")
    assert brats.shape == (4, 1, 1, 6) and set(brats.unique().tolist()) == {0.0, 1.0}
    np.testing.assert_array_equal(brats[:, 0, 0].numpy(), [[0, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                                           [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1]])
    head = condition_from_label(lab, "wholehead")
    np.testing.assert_array_equal(head[:, 0, 0].numpy(), [[0, 0, 0, 0, 1, 1], [0, 1, 1, 1, 0, 0]])
    assert head.sum(0).max() == 1  # exclusive channels


def test_condition_encoding_is_the_same_for_every_label_dtype_and_for_labels_outside_the_scheme():
    """The lookup-table encoding equals the per-channel membership test for integer, float and torch label maps,
    including a label no channel names (7: all zero)."""
    lab = np.random.default_rng(0).choice([0, 1, 2, 3, 4, 7], size=(5, 6, 7))
    for scheme, groups in CONDITION_LABELS.items():
        want = np.stack([np.isin(lab, vals) for vals in groups]).astype(np.float32)
        for variant in (lab.astype(np.uint8), lab.astype(np.int16), lab.astype(np.float32), torch.as_tensor(lab)):
            got = condition_from_label(variant, scheme)
            assert got.dtype == torch.float32
            np.testing.assert_array_equal(got.numpy(), want)


def test_config_hash_ignores_run_length_but_not_the_recipe():
    cfg = get_config("tiny")
    assert cfg.hash() == cfg.replace(steps=999, checkpoint_every=3, num_threads=1).hash()
    assert cfg.hash() != cfg.replace(lr=1e-4).hash() != cfg.replace(loss="l2").hash()
    assert MedDDPMConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.hash() == cfg.replace(device="cpu", precision="fp32", grad_checkpoint=True).hash()  # runtime only
    with pytest.raises(ConfigError, match="norm_num_groups"):
        cfg.replace(channels=(12, 16, 16))
    with pytest.raises(ConfigError, match="unknown Med-DDPM profile"):
        get_config("nope")


def test_cosine_schedule_matches_the_paper_formula():
    """Paper: cosine (s = 0.008), betas clipped at 0.999, T = 250 (MONAI 1.6.1 clips at 0.999 too)."""
    T, s = 250, 0.008
    f = [math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = np.clip([1 - f[t + 1] / f[t] for t in range(T)], 0, 0.999)
    got = make_training_scheduler(T).betas.double().numpy()
    np.testing.assert_allclose(got, betas, rtol=1e-4, atol=1e-6)  # MONAI computes in float32
    assert got.max() == pytest.approx(0.999)


STEP_COUNTS = (1, 7, 20, 25, 30, 50, 100, 250)
SAMPLER_SPECS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0), ("dpmpp2m", 0.0), ("dpmpp2m-sde", 1.0)]


def _run(sampler, eps_fn, steps, shape=(1, 1, 32, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    return run_sampler(eps_fn, x, sampler, steps, lambda: torch.randn(shape, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name,eta", SAMPLER_SPECS)
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_samplers_return_the_clean_image_for_every_step_count(name, eta, steps):
    """Point oracle: a denoiser returning the exact ε of a known x0 must give back x0 for every n, in particular
    n not dividing T = 250 (MONAI's fixed stride T // n stopped DDIM at t = 9 for n = 20 and 30, at 49 for 100)."""
    target = torch.linspace(-0.9, 0.9, 8 * 8 * 8, dtype=torch.float64).reshape(1, 1, 8, 8, 8)
    sampler = make_sampler(name, eta=eta)

    def eps(x, t):
        a = sampler.schedule.alpha_bar(t)
        return (x - a ** 0.5 * target) / (1 - a) ** 0.5

    out = _run(sampler, eps, steps, shape=target.shape)
    torch.testing.assert_close(out, target, atol=1e-6, rtol=0)


class _ExactVelocity(torch.nn.Module):
    """A "network" that returns the exact velocity v = (√ᾱ·x_t − x0)/√(1−ᾱ) of a known x0 (v-prediction oracle)."""

    def __init__(self, target: torch.Tensor, schedule):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.target, self.schedule = target, schedule

    def forward(self, inp, t):
        a = self.schedule.alpha_bar(int(t[0]))
        x_t = inp[:, : self.target.shape[1]].double()
        return ((a ** 0.5 * x_t - self.target) / (1 - a) ** 0.5).float()


@pytest.mark.parametrize("name,eta", SAMPLER_SPECS)
@pytest.mark.parametrize("steps", (1, 10, 25, 250))
def test_v_prediction_oracle_returns_the_clean_image(name, eta, steps):
    """sample(prediction="v") turns v̂ into ε̂ in float64: with the exact velocity of x0 every sampler returns x0,
    also from t = T-1 where √ᾱ ≈ 1e-4 (in float32 that first x̂0 would be rounding noise, clamped)."""
    sampler = make_sampler(name, eta=eta)
    target = torch.linspace(-0.95, 0.95, 2 * 6 * 6 * 6, dtype=torch.float64).reshape(1, 2, 6, 6, 6)
    cond = torch.zeros((1, 1, 6, 6, 6))
    out = sample(_ExactVelocity(target, sampler.schedule), sampler, cond, 2, steps, [0], prediction="v")
    torch.testing.assert_close(out.double(), target, atol=1e-6, rtol=0)


def test_v_training_target_is_the_velocity():
    """diffusion_loss(prediction="v") is zero for a network that outputs MONAI's velocity of (x0, noise, t)."""
    from synth.schedulers import make_training_scheduler
    from synth.train import diffusion_loss

    sched = make_training_scheduler(250, "cosine")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand((2, 1, 4, 4, 4), generator=g) * 2 - 1, torch.randn((2, 1, 4, 4, 4), generator=g)
    t = torch.tensor([3, 200])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0

    class Fixed(torch.nn.Module):
        def forward(self, inp, tt):
            return v

    assert float(diffusion_loss(Fixed(), x0, torch.zeros_like(x0), t, noise, sched, prediction="v")) < 1e-6
    assert float(diffusion_loss(Fixed(), x0, torch.zeros_like(x0), t, noise, sched)) > 0.1  # ε target differs


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("loss", ["l1", "l2"])
@pytest.mark.parametrize("gamma,floor", [(5.0, None), (5.0, 1.0), (None, 1.0)])
def test_min_snr_loss_counts_the_clean_image_error_as_min_snr_gamma(prediction, loss, gamma, floor):
    """A network whose output implies x̂0 = x0 + δ: with Min-SNR-γ its loss is min(SNR_t, γ)·δ² (l2) or
    √min(SNR_t, γ)·|δ| (l1) at every t, whichever the prediction; unweighted it would be SNR·δ² (ε) or
    (SNR+1)·δ² (v), which differ by orders of magnitude between t = 0 and t = T-1. With a floor the factor is
    max(min(SNR_t, γ), floor): the noisiest steps (SNR ~10⁻⁸) keep weight `floor` instead of almost none."""
    from synth.schedulers import make_training_scheduler
    from synth.train import diffusion_loss

    sched, delta = make_training_scheduler(250, "cosine"), 0.1
    g = torch.Generator().manual_seed(0)
    for t_value in (0, 40, 120, 200, 249):  # SNR from ~10⁴ to ~10⁻⁸: both sides of γ and of the floor
        x0, noise = torch.rand((1, 1, 4, 4, 4), generator=g) * 2 - 1, torch.randn((1, 1, 4, 4, 4), generator=g)
        t = torch.tensor([t_value])
        a = sched.alphas_cumprod[t].double().view(-1, 1, 1, 1, 1)
        x0_hat = x0.double() + delta
        xt = a.sqrt() * x0.double() + (1 - a).sqrt() * noise.double()
        out = ((xt - a.sqrt() * x0_hat) / (1 - a).sqrt() if prediction == "epsilon"
               else (a.sqrt() * xt - x0_hat) / (1 - a).sqrt())  # the ε̂ or v̂ whose x̂0 is x0 + δ

        class Fixed(torch.nn.Module):
            def forward(self, inp, tt, out=out):  # this draw's output (bound now, not at call time)
                return out.float()

        got = float(diffusion_loss(Fixed(), x0, torch.zeros_like(x0), t, noise, sched, loss, prediction=prediction,
                                   min_snr_gamma=gamma, snr_weight_floor=floor))
        snr = float(a / (1 - a))
        factor = max(min(snr, gamma or math.inf), floor or 0.0)
        want = factor * delta ** 2 if loss == "l2" else factor ** 0.5 * delta
        assert got == pytest.approx(want, rel=2e-3), (t_value, snr)


def test_min_snr_gamma_is_validated_and_leaves_unset_hashes_alone():
    """A config written before the field existed (the shipped v1 generator's) keeps its recorded hash."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    v1 = Path(__file__).resolve().parents[1] / "scripts" / "demo_generator_chain" / "demo-phantom-v1.safetensors"
    with safe_open(str(v1), "pt") as f:
        meta = f.metadata()
    assert "min_snr_gamma" not in json.loads(meta["config"])
    old = MedDDPMConfig.from_dict(json.loads(meta["config"]))
    assert old.min_snr_gamma is None and old.hash() == meta["config_hash"]
    assert old.hash() != old.replace(min_snr_gamma=5.0).hash() != old.replace(min_snr_gamma=2.0).hash()
    cfg = get_config("demo")
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        cfg.replace(min_snr_gamma=0.0)
    assert "snr_weight_floor" not in json.loads(meta["config"]) and old.snr_weight_floor is None
    assert cfg.snr_weight_floor == 1.0 and cfg.hash() != cfg.replace(snr_weight_floor=None).hash()
    for bad in (0.0, -1.0, 6.0):  # 6 > the demo profile's γ = 5: the bounds would cross
        with pytest.raises(ConfigError, match="snr_weight_floor"):
            cfg.replace(snr_weight_floor=bad)


@pytest.mark.parametrize("spacing", ["quadratic", "logsnr"])
@pytest.mark.parametrize("name,eta", SAMPLER_SPECS)
@pytest.mark.parametrize("steps", (1, 2, 7, 10, 25, 250))
def test_every_spacing_returns_the_clean_image(name, eta, steps, spacing):
    target = torch.linspace(-0.9, 0.9, 8 * 8 * 8, dtype=torch.float64).reshape(1, 1, 8, 8, 8)
    sampler = make_sampler(name, eta=eta, spacing=spacing)

    def eps(x, t):
        a = sampler.schedule.alpha_bar(t)
        return (x - a ** 0.5 * target) / (1 - a) ** 0.5

    torch.testing.assert_close(_run(sampler, eps, steps, shape=target.shape), target, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing", ["quadratic", "logsnr"])
@pytest.mark.parametrize("steps", [2, 3, 7, 10, 25, 60, 249, 250])
def test_few_step_spacings_are_distinct_and_end_at_t0(spacing, steps):
    ts = make_sampler("ddim", spacing=spacing).timesteps(steps)
    assert len(ts) == steps and ts[0] == 249 and ts[-1] == 0
    assert all(a > b for a, b in zip(ts, ts[1:]))
    if steps == 250:
        assert ts == list(range(249, -1, -1))


def test_logsnr_spacing_makes_ten_solver_steps_exact_on_the_gaussian_probe():
    """At 10 steps the leading spacing ends with one jump from t = 24 to the clean image and loses variance
    (DPM-Solver++ std 0.261 vs the true 0.300); log-SNR spacing ends at t = 0 and gets within 0.01."""
    std = {}
    for spacing in ("leading", "logsnr"):
        sampler = make_sampler("dpmpp2m", spacing=spacing)
        std[spacing] = float(_run(sampler, _gaussian_denoiser(sampler.schedule, 0.0, 0.3), 10).std())
    assert abs(std["logsnr"] - 0.3) < 0.01 < abs(std["leading"] - 0.3), std


def test_unknown_spacing_is_refused():
    with pytest.raises(ConfigError, match="spacing"):
        make_sampler("ddim", spacing="karras")


@pytest.mark.parametrize("steps", [1, 7, 20, 25, 30, 60, 75, 100, 150, 200, 249, 250])
def test_sampling_timesteps_descend_from_T_minus_1_and_are_distinct(steps):
    ts = sampling_timesteps(250, steps)
    assert len(ts) == steps and ts[0] == 249 and len(set(ts)) == steps
    assert all(a > b >= 0 for a, b in zip(ts, ts[1:]))
    if 250 % steps == 0:  # divisors keep DDIM's leading spacing (the default 25 steps: 249, 239, ..., 9)
        assert all(a - b == 250 // steps for a, b in zip(ts, ts[1:]))


def test_step_counts_outside_1_to_T_are_refused():
    for bad in (0, 251):
        with pytest.raises(ConfigError, match="between 1 and 250"):
            sampling_timesteps(250, bad)


def _gaussian_denoiser(schedule, mu: float, s: float):
    """Exact ε̂ = E[ε | x_t] when every voxel of x0 is N(mu, s^2) independently (bench/gaussian_probe.py)."""
    def eps(x, t):
        a = schedule.alpha_bar(t)
        x0 = mu + a ** 0.5 * s * s / (a * s * s + 1 - a) * (x - a ** 0.5 * mu)
        return (x - a ** 0.5 * x0) / (1 - a) ** 0.5
    return eps


# Allowed |std - 0.3| per sampler and step count. With the exact posterior-mean denoiser a correct sampler still has
# a discretisation error that shrinks with n: the ancestral chain (ddpm, ddim eta=1) loses Var[x0 | x_t] at every
# coarse jump (std 0.245 at 20 steps, 0.270 at 50, 0.293 at 250), the deterministic ODE samplers less (ddim eta=0:
# 0.268 at 20; dpmpp2m: 0.292 at 20). The tolerances sit ~0.01-0.02 above those values; the bugs they catch miss
# by far more (respaced ddpm with β_t at 25 steps: std 0.65; DDIM stopping at t = 9 for n = 20: noise left in).
GAUSSIAN_TOLERANCE = {20: 0.07, 25: 0.065, 30: 0.06, 50: 0.045, 100: 0.03, 250: 0.015}


@pytest.mark.parametrize("name,eta", SAMPLER_SPECS)
@pytest.mark.parametrize("steps", sorted(GAUSSIAN_TOLERANCE))
def test_samplers_reproduce_a_gaussian_data_distribution(name, eta, steps):
    mu, s = 0.2, 0.3
    sampler = make_sampler(name, eta=eta)
    x = _run(sampler, _gaussian_denoiser(sampler.schedule, mu, s), steps)
    assert abs(float(x.mean()) - mu) < 0.01
    assert abs(float(x.std()) - s) < GAUSSIAN_TOLERANCE[steps], float(x.std())


@pytest.mark.parametrize("name,eta,steps", [("ddpm", 0.0, 250), ("ddim", 1.0, 25), ("ddim", 0.0, 25),
                                            ("dpmpp2m", 0.0, 25)])
def test_a_chain_started_at_start_t_samples_the_posterior_of_the_noised_data(name, eta, steps):
    """SDEdit / img2img (run_sampler's start_t) on the Gaussian oracle: x0 ~ N(mu, s^2) per voxel, x_t0 drawn from
    q(x_t0 | x0), the exact denoiser. The chain from t0 must end at N(mu, s^2) (std within the tolerance of a chain
    from pure noise) and keep as much of x0 as x_t0 holds: an ancestral chain samples p(x0 | x_t0), whose
    correlation with x0 is Var(E[x0|x_t0]) / s^2 = 0.142 at t0 = 99; a deterministic (ODE) chain maps x_t0
    monotonically, so it keeps corr(x_t0, x0) = 0.376. Ignoring start_t (the whole chain on x_t0 as if it were
    pure noise) gives correlation ~0 (ancestral) or std 0.18 (ODE); starting 40 timesteps early or late moves the
    ancestral correlation to 0.27-0.29 or 0.07-0.08."""
    mu, s, t0, shape = 0.2, 0.3, 99, (1, 1, 32, 32, 32)
    sampler = make_sampler(name, eta=eta)
    a = sampler.schedule.alpha_bar(t0)
    g = torch.Generator().manual_seed(0)
    x0 = mu + s * torch.randn(shape, generator=g, dtype=torch.float64)
    x_t0 = a ** 0.5 * x0 + (1 - a) ** 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)
    denoise = _gaussian_denoiser(sampler.schedule, mu, s)
    ancestral = sampler.stochastic

    def run(start_t, seed=1):
        gen = torch.Generator().manual_seed(seed)
        return run_sampler(denoise, x_t0.clone(), sampler, steps,
                           lambda: torch.randn(shape, generator=gen, dtype=torch.float64), start_t=start_t)

    def corr(out):
        return float(torch.corrcoef(torch.stack([out.flatten(), x0.flatten()]))[0, 1])

    posterior_var = s * s * (1 - a) / (a * s * s + 1 - a)
    want = (s * s - posterior_var) / (s * s) if ancestral else a ** 0.5 * s / (a * s * s + 1 - a) ** 0.5
    tol_corr = 0.02 if steps == 250 or not ancestral else 0.04  # the respaced ancestral chain loses some spread
    out = run(t0)
    assert abs(float(out.mean()) - mu) < 0.01 and abs(float(out.std()) - s) < GAUSSIAN_TOLERANCE[steps]
    assert abs(corr(out) - want) < tol_corr, (corr(out), want)
    whole = run(None)  # what ignoring start_t would give
    if ancestral:
        assert abs(corr(whole)) < 0.03
        assert all(abs(corr(run(t)) - want) > tol_corr for t in (t0 - 40, t0 + 40))
    else:
        assert abs(float(whole.std()) - s) > GAUSSIAN_TOLERANCE[steps]
    torch.testing.assert_close(run(sampler.timesteps(steps)[0]), whole)  # the chain's own start = the default
    with pytest.raises(ConfigError, match="start_t"):
        run(250)


def test_ancestral_ddpm_with_few_steps_is_ddim_with_eta_1_and_the_solver_converges_fastest():
    """Respaced DDPM's posterior equals DDIM's at eta = 1 (same noise draws -> same sample), and at 25 steps
    DPM-Solver++(2M) is closest to the true std, then deterministic DDIM, then the ancestral chain."""
    mu, s = 0.0, 0.3
    std = {}
    for name, eta in SAMPLER_SPECS:
        sampler = make_sampler(name, eta=eta)
        out = _run(sampler, _gaussian_denoiser(sampler.schedule, mu, s), 25)
        std[(name, eta)] = float(out.std())
    assert std[("ddpm", 0.0)] == pytest.approx(std[("ddim", 1.0)], abs=1e-9)
    err = {k: abs(v - s) for k, v in std.items()}
    assert err[("dpmpp2m", 0.0)] < err[("ddim", 0.0)] < err[("ddim", 1.0)]


@pytest.mark.parametrize("name,eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_analytic_variance_makes_ten_step_chains_exact_on_the_gaussian_probe(name, eta):
    """Analytic-DPM (Bao et al. 2022): with the exact denoiser the moment-matched step is exact for Gaussian data
    up to the clamp of x̂0 and the per-sample estimate of Var[x0 | x_t], so 10 steps (quadratic spacing: the last
    jump starts at t = 0) reproduce std 0.3 to within 0.01. The same chains with the posterior variance alone lose
    the spread of x0 at each coarse jump (std 0.23 for eta = 1, 0.26 for the deterministic ODE)."""
    steps = 10
    mu, s = 0.2, 0.3
    std = {}
    for analytic in (False, True):
        sampler = make_sampler(name, eta=eta, spacing="quadratic", analytic=analytic)
        x = _run(sampler, _gaussian_denoiser(sampler.schedule, mu, s), steps)
        assert abs(float(x.mean()) - mu) < 0.01
        std[analytic] = float(x.std())
    assert abs(std[True] - s) < 0.01, std
    assert abs(std[False] - s) > 0.03, std


def test_analytic_ddpm_equals_analytic_ddim_with_eta_1_and_ends_without_noise():
    """Respaced DDPM and DDIM at eta = 1 share the posterior, so their analytic variances (x0's coefficient in the
    mean, written two ways) must agree draw for draw; and the final step adds no noise: the point oracle's
    chain returns its x0 exactly."""
    mu, s = 0.0, 0.3
    outs = []
    for name, eta in (("ddpm", 0.0), ("ddim", 1.0)):
        sampler = make_sampler(name, eta=eta, spacing="quadratic", analytic=True)
        outs.append(_run(sampler, _gaussian_denoiser(sampler.schedule, mu, s), 10))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-9, rtol=0)
    target = torch.linspace(-0.9, 0.9, 8 * 8 * 8, dtype=torch.float64).reshape(1, 1, 8, 8, 8)
    sampler = make_sampler("ddim", eta=0.0, analytic=True)

    def eps(x, t):
        a = sampler.schedule.alpha_bar(t)
        return (x - a ** 0.5 * target) / (1 - a) ** 0.5

    torch.testing.assert_close(_run(sampler, eps, 10, shape=target.shape), target, atol=1e-6, rtol=0)


def test_analytic_variance_is_recorded_and_refused_where_undefined():
    assert make_sampler("ddim", eta=1.0, spacing="quadratic", analytic=True).label() == \
        "analytic-ddim(eta=1)/quadratic"
    assert make_sampler("ddim", eta=0.0, analytic=True).stochastic
    with pytest.raises(ConfigError, match="Analytic"):
        make_sampler("dpmpp2m", analytic=True)


def test_unknown_sampler_and_negative_eta_are_refused():
    with pytest.raises(ConfigError, match="unknown sampler"):
        make_sampler("euler")
    with pytest.raises(ConfigError, match="eta"):
        make_sampler("ddim", eta=-1)


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name,steps,eta", [("ddpm", 25, 0.0), ("ddim", 8, 0.0), ("ddim", 8, 1.0),
                                            ("dpmpp2m", 8, 0.0), ("dpmpp2m-sde", 8, 1.0)])
def test_sampling_is_deterministic_per_seed_and_batched(name, steps, eta):
    cfg = get_config("tiny")
    torch.manual_seed(0)
    net = build_unet(cfg).eval()
    lab = np.full((16, 20, 16), 4, np.uint8)
    lab[:2] = 0
    lab[6:9, 8:11, 6:9] = 2
    cond = torch.stack([condition_from_label(lab, cfg.condition)] * 2)
    a = sample(net, make_sampler(name, eta=eta), cond, 4, steps, [7, 8])
    b = sample(net, make_sampler(name, eta=eta), cond, 4, steps, [7, 8])
    assert a.shape == (2, 4, 16, 20, 16) and a.abs().max() <= 1
    assert _hash(a) == _hash(b)                      # same seeds -> identical bytes
    assert _hash(a[0]) != _hash(a[1])                # different seeds -> different samples
    single = sample(net, make_sampler(name, eta=eta), cond[:1], 4, steps, [7])
    torch.testing.assert_close(single[0], a[0], atol=1e-4, rtol=0)  # independent of batch partners


def test_configs_of_earlier_versions_still_load():
    """Generators written before precision/warm-up changed stored autocast_bf16 and lr_schedule='warmup'."""
    d = get_config("tiny").to_dict()
    d.pop("precision")
    d.update(autocast_bf16=True, lr_schedule="warmup")
    cfg = MedDDPMConfig.from_dict(d)
    assert cfg.precision == "bf16" and cfg.lr_schedule == "constant"


def _saved_bytes_and_grads(net, x, t):
    saved = [0]

    def pack(tn):
        saved[0] += tn.numel() * tn.element_size()
        return tn

    net.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tn: tn):
        loss = net(x, t).abs().mean()
    loss.backward()
    return saved[0], [p.grad.clone() for p in net.parameters()]


def test_activation_checkpointing_gives_the_same_gradients_with_less_saved_memory():
    from synth.grad_checkpoint import enable_grad_checkpointing

    cfg = get_config("demo")
    torch.manual_seed(0)
    net = build_unet(cfg).train()
    x, t = torch.randn(1, cfg.in_channels, 32, 40, 32), torch.tensor([17])
    plain_bytes, plain_grads = _saved_bytes_and_grads(net, x, t)
    assert enable_grad_checkpointing(net) > len(net.down_blocks) + len(net.up_blocks) + 1  # per ResNet/attention
    ck_bytes, ck_grads = _saved_bytes_and_grads(net, x, t)
    for a, b in zip(plain_grads, ck_grads):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert ck_bytes < 0.25 * plain_bytes, (ck_bytes, plain_bytes)  # activations for backward: 4x less or better
    assert list(net.state_dict()) == list(build_unet(cfg).state_dict())  # checkpoints keep their keys


@pytest.mark.parametrize("flag,want", [([], (5.0, 1.0)), (["--snr-weight-floor", "0.5"], (5.0, 0.5)),
                                       (["--snr-weight-floor", "none"], (5.0, None)),
                                       (["--min-snr-gamma", "none", "--snr-weight-floor", "none"], (None, None))])
def test_cli_train_snr_weighting_can_be_set_or_removed(monkeypatch, tmp_path, flag, want):
    """`medddpm train --snr-weight-floor none` trains without the demo profile's floor (how v2's runs are
    reproduced, scripts/pretrain_demo_generator.py), `--min-snr-gamma none` without the weighting (v1's run); a
    number replaces the profile's value; no flag keeps it."""
    import synth.train
    from medddpm.cli import main

    seen = []
    monkeypatch.setattr(synth.train, "train_medddpm",
                        lambda manifest, profile, out, config: seen.append(config) or "generator.safetensors")
    assert main(["train", "--manifest", "m.csv", "--out", str(tmp_path / "o"), "--profile", "demo", *flag]) == 0
    cfg = seen[0] if isinstance(seen[0], MedDDPMConfig) else get_config("demo", **seen[0])
    assert (cfg.min_snr_gamma, cfg.snr_weight_floor) == want and cfg.loss == "l2"


def test_cli_train_sets_the_cosine_schedules_end(monkeypatch, tmp_path):
    """`--lr-min` reaches the config (v4's pre-training stage decays to 1e-5, scripts/pretrain_demo_generator.py);
    without it the profile's value stays."""
    import synth.train
    from medddpm.cli import main

    seen = []
    monkeypatch.setattr(synth.train, "train_medddpm",
                        lambda manifest, profile, out, config: seen.append(config) or "generator.safetensors")
    common = ["train", "--manifest", "m.csv", "--out", str(tmp_path / "o"), "--profile", "demo",
              "--lr-schedule", "cosine"]
    assert main([*common, "--lr-min", "1e-5"]) == 0 and main(common) == 0
    got = [get_config("demo", **c) for c in seen]
    assert got[0].lr_min == 1e-5 and got[1].lr_min == get_config("demo").lr_min != 1e-5

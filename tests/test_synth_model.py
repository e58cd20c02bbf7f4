"""Med-DDPM network configuration, condition encoding and samplers (no training needed)."""
from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
import torch

from cohort.errors import CohortError
from synth.config import CONDITION_CHANNELS, MedDDPMConfig, get_config
from synth.network import build_unet, condition_from_label, count_parameters
from synth.schedulers import (DDIMSampler, DDPMSampler, DPMSolverPP2MSampler, make_sampler,
                              make_training_scheduler, sample)


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: one thread is faster than two under load
    yield
    torch.set_num_threads(old)


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


def test_config_hash_ignores_run_length_but_not_the_recipe():
    cfg = get_config("tiny")
    assert cfg.hash() == cfg.replace(steps=999, checkpoint_every=3, num_threads=1).hash()
    assert cfg.hash() != cfg.replace(lr=1e-4).hash() != cfg.replace(loss="l2").hash()
    assert MedDDPMConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(CohortError, match="norm_num_groups"):
        cfg.replace(channels=(12, 16, 16))
    with pytest.raises(CohortError, match="unknown Med-DDPM profile"):
        get_config("nope")


def test_cosine_schedule_matches_the_paper_formula():
    """Paper: cosine (s = 0.008), betas clipped at 0.999, T = 250 (MONAI 1.6.1 clips at 0.999 too)."""
    T, s = 250, 0.008
    f = [math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    betas = np.clip([1 - f[t + 1] / f[t] for t in range(T)], 0, 0.999)
    got = make_training_scheduler(T).betas.double().numpy()
    np.testing.assert_allclose(got, betas, rtol=1e-4, atol=1e-6)  # MONAI computes in float32
    assert got.max() == pytest.approx(0.999)


def _gaussian_oracle(sched, mu: float, s: float):
    """Exact ε-prediction when every voxel of x0 is N(mu, s^2) independently."""
    def eps(x, t):
        a = float(sched.alphas_cumprod[t]) ** 0.5
        sig = (1 - a * a) ** 0.5
        x0 = mu + a * s * s / (a * a * s * s + sig * sig) * (x - a * mu)
        return (x - a * x0) / sig
    return eps


def _run(sampler, eps_fn, steps, shape=(1, 1, 32, 32, 32), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    sampler.set_timesteps(steps)
    for t in sampler.timesteps:
        x, _ = sampler.step(eps_fn(x, int(t)), int(t), x, generator=g)
    return x


@pytest.mark.parametrize("cls", [DDPMSampler, DDIMSampler, DPMSolverPP2MSampler])
def test_samplers_recover_a_point_distribution_exactly(cls):
    target = torch.linspace(-0.9, 0.9, 8 * 8 * 8).reshape(1, 1, 8, 8, 8)
    sampler = cls(250)

    def eps(x, t):
        a = float(sampler.alphas_cumprod[t])
        return (x - a ** 0.5 * target) / (1 - a) ** 0.5

    steps = 250 if cls is DDPMSampler else 10
    out = _run(sampler, eps, steps, shape=target.shape)
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)


def test_fast_samplers_reproduce_a_gaussian_distribution_and_the_solver_converges_faster():
    mu, s = 0.2, 0.3
    sched = make_training_scheduler(250)
    eps = _gaussian_oracle(sched, mu, s)
    errs = {}
    for name in ("ddim", "dpmpp2m"):
        x = _run(make_sampler(name), eps, 50)
        errs[name] = abs(float(x.std()) - s) + abs(float(x.mean()) - mu)
        assert errs[name] < 0.03, name
    # second order: at 50 steps DPM-Solver++(2M) is closer to the true distribution than DDIM (0.010 vs 0.018 here)
    assert errs["dpmpp2m"] < errs["ddim"]


def test_ddim_timesteps_start_at_T_minus_1_and_match_monais_stride():
    d = DDIMSampler(250)
    d.set_timesteps(20)
    ts = d.timesteps.tolist()
    assert ts[0] == 249 and len(ts) == 20 and all(a - b == 250 // 20 for a, b in zip(ts, ts[1:]))


def _hash(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("name,steps,eta", [("ddpm", 25, 0.0), ("ddim", 8, 0.0), ("ddim", 8, 1.0),
                                            ("dpmpp2m", 8, 0.0)])
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

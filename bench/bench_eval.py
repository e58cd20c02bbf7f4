"""eval/ cost ratios measured in one run (timings on a shared machine are noisy; ratios less so).

Run: .venv/bin/python -m bench.bench_eval
Prints: Dice+HD95 per case demo vs tiny grid; MS-SSIM batched (16 pairs per call) vs one pair per call, and demo vs
tiny; vectorised vs per-resample bootstrap; memorisation similarity per pair demo vs tiny.
"""
from __future__ import annotations

import argparse

import numpy as np

from bench.harness import time_calls
from bench.toy_data import make_toy_case


def _timeit(fn, repeat=3):
    return time_calls(fn, repeat).min


def _case(shape, rng):
    images, label = make_toy_case(rng, shape)
    return np.stack([images[m] for m in ("t1", "t1ce", "t2", "flair")]), label


def main():
    import warnings

    from scipy.stats import bootstrap

    from eval.memorisation import brain_correlation
    from eval.segmentation import region_scores
    from eval.synthesis import pairwise_ms_ssim

    warnings.simplefilter("ignore")
    rng = np.random.default_rng(0)
    tiny = [_case((16, 20, 16), rng) for _ in range(8)]
    demo = [_case((32, 40, 32), rng) for _ in range(8)]

    def seg(cases):
        return lambda: [region_scores(np.roll(lab, 1, 0), lab, (4.5, 4.5, 4.5)) for _, lab in cases[:4]]

    t_seg_tiny, t_seg_demo = _timeit(seg(tiny)) / 4, _timeit(seg(demo)) / 4
    pairs = [(i, j) for i in range(8) for j in range(i + 1, 8)][:16]
    vt, vd = [v for v, _ in tiny], [v for v, _ in demo]
    t_ms_batched = _timeit(lambda: pairwise_ms_ssim(vd, pairs, batch=16)) / 16
    t_ms_single = _timeit(lambda: pairwise_ms_ssim(vd, pairs, batch=1)) / 16
    t_ms_tiny = _timeit(lambda: pairwise_ms_ssim(vt, pairs, batch=16)) / 16
    x = rng.uniform(0.5, 0.9, 40)
    t_bs_vec = _timeit(lambda: bootstrap((x,), np.mean, n_resamples=2000, method="percentile", vectorized=True,
                                         rng=np.random.default_rng(0)))
    t_bs_loop = _timeit(lambda: bootstrap((x,), np.mean, n_resamples=2000, method="percentile", vectorized=False,
                                          rng=np.random.default_rng(0)), repeat=1)

    def sim(cases):
        return lambda: [brain_correlation(cases[i][0], cases[j][0], (cases[i][1] > 0) | (cases[j][1] > 0))
                        for i, j in pairs]

    t_sim_tiny, t_sim_demo = _timeit(sim(tiny)) / 16, _timeit(sim(demo)) / 16
    print(f"Dice+HD95 (3 regions) per case, demo/tiny: {t_seg_demo / t_seg_tiny:.1f}x "
          f"(demo {t_seg_demo * 1e3:.0f} ms, tiny {t_seg_tiny * 1e3:.0f} ms)")
    print(f"MS-SSIM per pair (demo, 4 channels), one pair per call / 16 per call: {t_ms_single / t_ms_batched:.2f}x "
          f"(batched {t_ms_batched * 1e3:.1f} ms/pair)")
    print(f"MS-SSIM per pair, demo/tiny: {t_ms_batched / t_ms_tiny:.1f}x (tiny {t_ms_tiny * 1e3:.1f} ms/pair)")
    print(f"bootstrap (2000 resamples, n=40), per-resample / vectorised: {t_bs_loop / t_bs_vec:.0f}x "
          f"(vectorised {t_bs_vec * 1e3:.1f} ms)")
    print(f"brain correlation per pair, demo/tiny: {t_sim_demo / t_sim_tiny:.1f}x (demo {t_sim_demo * 1e3:.2f} ms)")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    main()

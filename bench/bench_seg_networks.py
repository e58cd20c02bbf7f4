"""Training-step time of the MONAI segmenter networks (SegResNet vs DynUNet) at a profile's size, in one run.

    .venv/bin/python -m bench.bench_seg_networks [--profile demo] [--steps 20] [--threads 1]

Same loss, optimiser, batch and random input for both (the real training loop's pieces: segment.monai_backend.
build_network, DiceCE as in training); prints the median step time, parameters and the ratio to SegResNet.
"""
from __future__ import annotations

import argparse

import torch

from bench.harness import time_calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="demo", choices=("tiny", "demo"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    from monai.losses import DiceCELoss

    from cohort.profiles import get_profile
    from segment.config import SegmenterConfig
    from segment.monai_backend import build_network

    torch.set_num_threads(args.threads)
    shape = get_profile(args.profile).shape
    g = torch.Generator().manual_seed(0)
    rows = []
    for network in ("segresnet", "dynunet"):
        cfg = SegmenterConfig(profile=args.profile, network=network).resolved()
        torch.manual_seed(0)
        model = build_network(cfg, 4)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-5)
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)
        x = torch.randn((cfg.batch_size, 4, *shape), generator=g)
        y = torch.randint(0, 4, (cfg.batch_size, 1, *shape), generator=g)

        def step(model=model, opt=opt, loss_fn=loss_fn, x=x, y=y):
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        timing = time_calls(step, args.steps, warmup=args.warmup)
        n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        rows.append((network, cfg.init_filters, n_params, timing.median))
    base = rows[0][3]
    print(f"profile {args.profile} {shape}, batch {cfg.batch_size}, {args.threads} thread(s), {args.steps} timed steps")
    print("| network | init filters | parameters | step s (median) | x SegResNet |")
    print("|---|---|---|---|---|")
    for network, filt, n, t in rows:
        print(f"| {network} | {filt} | {n / 1e6:.2f} M | {t:.3f} | {t / base:.2f} |")


if __name__ == "__main__":
    main()

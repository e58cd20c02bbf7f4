"""A distilled student beside its teacher, on the same masks and starting noise (synth.distill).

For each of a few masks of a manifest and seeds: the teacher's DDIM (eta 0) chain at the card's teacher_steps (what
the student was distilled to reproduce), the student's own N steps (the ``distilled`` sampler), and the teacher's
plain DDIM (eta 0) at N steps. Prints, per sampler, the mean absolute difference to the teacher's chain (same
noise, images in [-1, 1]), the network evaluations per volume and the sampling time per volume (min and median of
--repeats timed repeats). A student that learned its rounds lies closer to the teacher's chain than the plain
N-step DDIM of the teacher does. Sampling time only: no quality gate, no writing (bench.bench_sampler_table times
the written and gated volumes). The quality gate (synth.quality) checks each sample with the intensity ranges beside
the student.

    nice -n 5 .venv/bin/python -m bench.bench_distill --student /tmp/team/distill/demo-probe \\
        --manifest /tmp/team/default-study-ref/cohort/data_manifest.csv --masks 2 --repeats 3 --ddpm
    nice -n 5 .venv/bin/python -m bench.bench_distill --student synth/pretrained/demo-phantom-v4.safetensors \
        --manifest /tmp/team/default-study-ref/cohort/data_manifest.csv --step-times 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from cohort.labels import BACKGROUND, BRAIN, ED, ET, NCR

REGIONS = ((BACKGROUND, "background"), (BRAIN, "brain"), (ED, "ED"), (ET, "ET"), (NCR, "NCR"))


def step_times(generator: str, manifest: str, repeats: int, teacher_steps: int = 16) -> dict:
    """min and median seconds of one training step (synth.train.diffusion_loss + backward + Adam) and one
    distillation step (synth.distill.distillation_loss, the teacher's two calls inside, + backward + Adam) of the
    generator's network on its profile's batch, interleaved in one process: their ratio holds on a loaded machine
    where the absolute times do not."""
    from cohort.profiles import get_profile
    from synth.checkpoint import load_generator
    from synth.data import collate_pair, load_items, training_rows
    from synth.distill import RoundPlan, distillation_loss
    from synth.schedulers import NoiseSchedule, make_training_scheduler
    from synth.train import diffusion_loss

    teacher, cfg, _ = load_generator(generator)
    student, _, _ = load_generator(generator)
    student.train()
    items = load_items(manifest, cfg, training_rows(manifest, cfg).head(cfg.batch_size), get_profile(cfg.profile).shape)
    x0, cond = collate_pair(items)
    sched, schedule = make_training_scheduler(cfg.timesteps, cfg.schedule), NoiseSchedule.build(cfg.timesteps)
    plan = RoundPlan.build(schedule.T, teacher_steps // 2)
    opt = torch.optim.Adam(student.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(0)
    times = {"train": [], "distill": []}
    for _ in range(repeats + 1):  # the first of each is a warm-up
        for kind in ("train", "distill"):
            t0 = time.perf_counter()
            opt.zero_grad()
            if kind == "train":
                loss = diffusion_loss(student, x0, cond, torch.randint(0, cfg.timesteps, (len(x0),), generator=g),
                                      torch.randn(x0.shape, generator=g), sched, cfg.loss, prediction=cfg.prediction,
                                      min_snr_gamma=cfg.min_snr_gamma, snr_weight_floor=cfg.snr_weight_floor)
            else:
                loss = distillation_loss(student, teacher, x0, cond, torch.randint(0, plan.n, (len(x0),), generator=g),
                                         torch.randn(x0.shape, generator=g, dtype=torch.float64), plan, schedule,
                                         cfg.prediction, 1.0 if cfg.prediction == "v" else None)
            loss.backward()
            opt.step()
            times[kind].append(time.perf_counter() - t0)
    out = {k: {"min": min(v[1:]), "median": statistics.median(v[1:])} for k, v in times.items()}
    out["ratio_of_medians"] = out["distill"]["median"] / out["train"]["median"]
    out["ratio_of_mins"] = out["distill"]["min"] / out["train"]["min"]
    return out


def main(argv=None) -> int:
    from cohort.manifest import case_files, load_manifest, select
    from cohort.nifti import read_label
    from synth.checkpoint import load_generator, resolve_generator
    from synth.distill import student_card
    from synth.network import condition_from_label
    from synth.quality import MARGIN, check_sample, load_gate_ranges
    from synth.schedulers import NoiseSchedule, distilled_sampler, make_sampler, sample

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", required=True, help="the student's generator.safetensors or folder")
    ap.add_argument("--teacher", help="the teacher (default: the card's path)")
    ap.add_argument("--manifest", required=True, help="a manifest whose real train masks condition the samples")
    ap.add_argument("--masks", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (min and median reported)")
    ap.add_argument("--ddpm", action="store_true", help="also time the paper's DDPM-250 (slow)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--step-times", type=int, metavar="K",
                    help="instead: time K training and K distillation steps of the teacher's network, interleaved")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.step_times:
        print(json.dumps(step_times(a.teacher or a.student, a.manifest, a.step_times), indent=1))
        return 0
    student_path = resolve_generator(a.student)
    student, cfg, meta = load_generator(student_path)
    card = student_card(meta, student_path)
    teacher, tcfg, _ = load_generator(a.teacher or card["teacher"])
    n, big = int(card["student_steps"]), int(card["teacher_steps"])
    rows = select(load_manifest(a.manifest), source=["real"], split=["train"]).sort_values("case_id").head(a.masks)
    labels = [read_label(case_files(a.manifest, r).label)[0] for _, r in rows.iterrows()]
    cond = torch.stack([condition_from_label(lab, cfg.condition) for lab in labels])
    ranges = load_gate_ranges(student_path.parent / "intensity_ranges.json", imported=False)
    seeds = list(range(len(rows)))
    schedule = NoiseSchedule.build(cfg.timesteps, cfg.schedule)
    runs = [("teacher ddim(eta=0)", teacher, make_sampler("ddim", eta=0.0), big),
            (f"student {card['sampler']}", student, distilled_sampler(n, schedule), n),
            ("teacher ddim(eta=0)", teacher, make_sampler("ddim", eta=0.0), n),
            ("teacher ddim(eta=1) (parity sampler)", teacher, make_sampler("ddim", eta=1.0), 10)]
    if a.ddpm:
        runs.append(("teacher ddpm (paper)", teacher, make_sampler("ddpm"), 250))
    reference = None
    print(f"student {student_path} ({card['method']}, {big} -> {n} steps, teacher {card['teacher_sha256'][:12]}); "
          f"{len(rows)} masks, {a.threads} threads")
    print(f"{'sampler':<40}{'steps':>6}{'evals/vol':>10}{'MAE to teacher chain':>22}{'gate':>6}{'s/vol min':>11}"
          f"{'median':>9}  MAE per region (the tumour's sub-regions are ~1 % of the voxels: the plain MAE hides them)")
    label_of_voxel = torch.as_tensor(np.stack(labels)).unsqueeze(1)  # (B, 1, ...) against (B, C, ...) images
    results = []
    for name, model, sampler, steps in runs:
        times, x = [], None
        for _ in range(a.repeats if steps < 250 else 1):
            t0 = time.perf_counter()
            x = sample(model, sampler, cond, cfg.out_channels, steps, seeds, prediction=cfg.prediction)
            times.append((time.perf_counter() - t0) / len(seeds))
        if reference is None:
            reference = x
        mae = float((x - reference).abs().mean())
        region_mae = {name_: float((x - reference).abs()[label_of_voxel.expand_as(x) == v].mean())
                      for v, name_ in REGIONS if bool((label_of_voxel == v).any())}
        passed = sum(not check_sample(x[j].numpy(), labels[j], ranges, cfg.modalities, MARGIN)
                     for j in range(len(seeds)))
        results.append({"sampler": name, "steps": steps, "mae_to_teacher_chain": mae, "gate_passed": passed,
                        "s_per_volume_min": min(times), "s_per_volume_median": statistics.median(times),
                        "mae_by_region": region_mae})
        print(f"{name:<40}{steps:>6}{steps:>10}{mae:>22.4f}{f'{passed}/{len(seeds)}':>6}{min(times):>11.3f}"
              f"{statistics.median(times):>9.3f}  " + " ".join(f"{k} {v:.4f}" for k, v in region_mae.items()))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

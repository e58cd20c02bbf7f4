"""Paired image–mask cohort synthesis from a trained generator, conditioned on masks from a manifest.

Resumable: a case is done once its row is in the output manifest (appended atomically after its files are
written atomically); a restarted run skips done cases, regenerates the rest with the same seeds and removes
temporary files a killed run left behind.
"""
from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from core.determinism import deterministic_algorithms
from core.device import resolve_device
from core.errors import InputError, ConfigError
from core.fsutil import atomic_write_text, sha256_file
from cohort.manifest import (append_rows, check_rows, damaged_files, load_manifest, make_row, resolve, select,
                             write_manifest)
from cohort.nifti import read_label, write_array
from cohort.profiles import get_profile
from core.threads import torch_threads
from cohort.volume import spacing_of

from .checkpoint import RANGES_FILE, SOURCE_META, load_generator, resolve_generator
from .config import MedDDPMConfig
from .mask_check import check_masks
from .network import condition_from_label
from .quality import MARGIN, check_sample, envelopes, load_gate_ranges
from . import defaults
from .schedulers import DISTILLED, NoiseSchedule, Sampler, distilled_sampler, make_sampler, sample

REPORT_FILE = "quality_report.csv"
REPORT_HEADER = "case_id,attempt,seed,passed,failures\n"
MANIFEST = "data_manifest.csv"
MASKS_KEPT_BYTES = 256 * 2**20  # conditioning label maps held from the mask check to sampling (uint8); more: read again


def case_seed(seed: int, index: int, attempt: int) -> int:
    """Seed of synthetic case `index`, attempt `attempt`: distinct for every (seed, index, attempt)."""
    return int(np.random.SeedSequence([int(seed), int(index), int(attempt)]).generate_state(1)[0])


@dataclass(frozen=True)
class SynthesisConfig:
    """How to synthesise a cohort (plain data; synthesize_cohort's settings, the defaults from synth.defaults)."""

    count: int                                      # synthetic cases to make
    # sampler (synth.schedulers.make_sampler)
    sampler: str = defaults.SAMPLER
    steps: int = defaults.STEPS
    seed: int = 0                                   # case i, attempt a draws with case_seed(seed, i, a)
    eta: float = defaults.ETA
    spacing: str = defaults.SPACING
    analytic: bool = defaults.ANALYTIC
    # conditioning masks: rows of the masks manifest with source in `sources` and split in `splits` (None: any),
    # only `case_ids` when given
    sources: tuple[str, ...] = ("real", "mask")
    splits: tuple[str, ...] | None = ("train",)
    case_ids: tuple[str, ...] | None = None
    # quality gate (synth.quality): redraws of a failing sample, and the envelopes' margin
    max_retries: int = defaults.MAX_RETRIES
    gate_margin: float = MARGIN
    # the output's names: manifest cohort, and case ids <case_prefix><index:05d>_<mask case id>
    cohort_name: str = "medddpm-synthetic"
    case_prefix: str = "syn"
    # where and how it runs (not what it makes)
    batch_size: int = defaults.BATCH_SIZE
    num_threads: int | None = None                # torch's intra-op threads; the gate and the writes run on as many
    progress: bool = True
    device: str = "auto"
    shard: tuple[int, int] | str | None = None     # (k, n) | "auto" (torchrun) | None: synthesize_cohort
    deterministic: bool = False                    # deterministic GPU kernels (core.determinism)


class _Job(NamedTuple):
    """One synthetic case to make: its index (seeds: case_seed(seed, index, attempt)), id and mask's manifest row."""

    index: int
    case_id: str
    mask_row: pd.Series


class _Mask(NamedTuple):
    label: np.ndarray
    affine: np.ndarray


class _Draw(NamedTuple):
    """The sample a case keeps: the last draw, its gate failures (empty = pass), attempt number and seed."""

    image: np.ndarray
    failures: list[str]
    attempt: int
    seed: int


@dataclass(frozen=True)
class _Generator:
    """A generator file loaded for sampling, with what the gate and the manifest rows need of it."""

    model: torch.nn.Module
    cfg: MedDDPMConfig
    sampler: Sampler
    sha256: str
    ranges: dict | None  # the gate's intensity ranges; None: an imported generator without them (not gated)
    envelopes: dict | None  # quality.envelopes of the ranges at the run's margin: once a run, not once a batch


def _clean_partial(out: Path) -> None:
    """Remove temporary files of an atomic write interrupted by SIGKILL (core.fsutil names them .*.tmp*)."""
    for p in out.rglob(".*.tmp*"):
        if p.is_file():
            p.unlink()


def synthesize_cohort(checkpoint: str | Path, masks_manifest: str | Path, out_dir: str | Path,
                      config: SynthesisConfig) -> Path:
    """Generate `config.count` paired image–mask cases; return the path of out_dir/data_manifest.csv (of the
    shard's manifest when ``config.shard`` is given).

    Masks: rows of `masks_manifest` with source in `sources` (real rows use their label; source=mask rows are
    edited masks) and split in `splits`, sorted by case id and used round-robin. Each synthetic case gets seed
    case_seed(seed, index, attempt); its mask is written unchanged on the same grid as the image. Rows record
    parent_case_id (the mask's case id), mask_edit, mask_source, origin_case_id (the real case at the root),
    generator_checkpoint (sha256), sampler, steps, seed, quality_gate (pass|fail; unchecked for an imported
    generator without intensity ranges) and attempts.
    Quality gate (synth.quality: per-label medians, background, texture): a failing sample is redrawn with a new
    seed up to `max_retries` times; cases still failing are kept and marked quality_gate=fail. quality_report.csv
    lists every attempt with each failed check, its measured value and the allowed range.
    device: where to run the generator (auto = CUDA when present). The seeded noise is drawn on the CPU and the
    network runs with TF32 off (synth.schedulers.sample), so a seed's noise is the same on every device; the
    samples are not: float32 rounds differently on another device, library version or batch size, a stochastic
    chain carries that on, and a borderline sample can pass the quality gate on one device and be redrawn on
    another. A seed repeats its sample on one device and software stack (on a GPU guaranteed only with
    ``deterministic``, which turns on core.determinism.deterministic_algorithms).
    shard: (k, n) = this process makes the cases whose index i has i % n == k, into
    out_dir/data_manifest.shard-k-of-n.csv (several processes, GPUs or Dask workers then share one out_dir without
    touching each other's files);
    "auto" takes k, n from torchrun's RANK / WORLD_SIZE (and, with device auto, the GPU from LOCAL_RANK).
    merge_shards(out_dir, n, count) then writes the cohort's data_manifest.csv atomically.
    """
    if config.count < 1:
        raise ConfigError("count must be at least 1")
    shard, device = _resolve_shard(config.shard, config.device)
    gen_path = resolve_generator(checkpoint)
    masks_manifest = Path(masks_manifest)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / (MANIFEST if shard is None else shard_manifest_name(*shard))
    report_file = out / (REPORT_FILE if shard is None else shard_report_name(*shard))
    _clean_partial(out)

    gen = _load_generator(gen_path, config, device)
    _refuse_other_generator(manifest, gen, config)
    rows = _mask_rows(masks_manifest, config.sources, config.splits, config.case_ids)
    indices = range(config.count) if shard is None else range(shard[0], config.count, shard[1])  # this process's cases
    checked = check_masks(masks_manifest, rows.iloc[sorted({i % len(rows) for i in indices})], gen.cfg,
                          keep_bytes=MASKS_KEPT_BYTES)  # all problems in 1 error; the label maps it read, to reuse
    repaired = _remove_damaged(manifest, report_file)
    written = load_manifest(manifest) if manifest.exists() else None  # this run is its only writer: held from here
    jobs, report_rows = _pending_jobs(written, report_file, rows, indices, config.case_prefix)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(indices), initial=len(indices) - len(jobs),
               desc=f"synthesize ({config.sampler}, {config.steps} steps)", disable=not config.progress,
               dynamic_ncols=True)
    with deterministic_algorithms(config.deterministic), torch_threads(config.num_threads), \
            _case_map() as map_cases:
        for batch, keep in _batches(jobs, set(repaired), rows, indices, config):
            masks = _read_masks(masks_manifest, batch, gen.cfg, checked)
            draws, report = _draw_until_pass(gen, config, batch, masks, map_cases)
            report_rows += [r for r in report if r["case_id"] in keep]
            kept = [(job, mask, draw) for job, mask, draw in zip(batch, masks, draws) if job.case_id in keep]
            new_rows = list(map_cases(lambda case: _write_case(manifest, *case, gen, config), kept))
            written = append_rows(manifest, new_rows, current=written)  # on disk before the next batch is drawn
            atomic_write_text(report_file, pd.DataFrame(report_rows).to_csv(index=False))
            bar.update(len(keep))
    bar.close()
    if repaired:  # the redrawn cases' rows back in their places: the manifest as the first run wrote it
        order = {_job(i, rows, config.case_prefix).case_id: i for i in indices}
        df = load_manifest(manifest)
        write_manifest(df.iloc[sorted(range(len(df)), key=lambda k: order.get(df["case_id"].iloc[k], -1))], manifest)
    if not report_file.exists():
        atomic_write_text(report_file, REPORT_HEADER)
    return manifest


def _remove_damaged(manifest: Path, report_file: Path) -> list[str]:
    """Cases of a resumed run whose files are missing or no longer have the manifest's sha256: their rows (and
    quality-report rows) and files are removed, so they are drawn again with their seeds (case_seed), which gives
    the same bytes on the same machine and software. Returns their case ids."""
    if not manifest.exists():
        return []
    damaged = sorted({cid for cid, _, _ in damaged_files(manifest)})
    if not damaged:
        return []
    print(f"{manifest.parent}: {len(damaged)} synthetic case(s) damaged or missing ({', '.join(damaged[:5])}"
          f"{' ...' if len(damaged) > 5 else ''}); drawing them again with their seeds", flush=True)
    df = load_manifest(manifest)
    write_manifest(df[~df["case_id"].isin(damaged)], manifest)
    if report_file.exists() and report_file.stat().st_size > len(REPORT_HEADER):
        rep = pd.read_csv(report_file)
        atomic_write_text(report_file, rep[~rep["case_id"].isin(damaged)].to_csv(index=False))
    for cid in damaged:
        for f in (manifest.parent / cid).glob("*") if (manifest.parent / cid).is_dir() else ():
            f.unlink()
    return damaged


def _job(index: int, rows: pd.DataFrame, case_prefix: str) -> _Job:
    row = rows.iloc[index % len(rows)]  # masks used round-robin
    return _Job(index, f"{case_prefix}{index:05d}_{row['case_id']}", row)


def _batches(jobs: list[_Job], redraw: set[str], rows: pd.DataFrame, indices: range, config: SynthesisConfig):
    """(batch to draw, case ids of it to write). A damaged case is drawn again inside the batch a run from the
    start drew it in: its neighbours' conditioning shapes the float rounding of a batched network call, so the
    same seed alone gives other bytes (measured: every image hash differed). The other pending cases in batches
    of batch_size, as always."""
    size = config.batch_size
    every = [_job(i, rows, config.case_prefix) for i in indices]
    position = {job.case_id: k for k, job in enumerate(every)}
    for chunk in sorted({position[c] // size for c in redraw}):
        batch = every[chunk * size:(chunk + 1) * size]
        yield batch, {job.case_id for job in batch} & redraw
    rest = [job for job in jobs if job.case_id not in redraw]
    for b in range(0, len(rest), size):
        yield rest[b:b + size], {job.case_id for job in rest[b:b + size]}


def _refuse_other_generator(manifest: Path, gen: "_Generator", config: SynthesisConfig) -> None:
    """A resumed run continues the cases already in ``manifest`` only if they were made by this generator, sampler
    and step count; otherwise the folder holds another cohort (a study rerun with another checkpoint or sampler),
    and resuming would hand its cases on as this run's."""
    if not manifest.exists():
        return
    df = load_manifest(manifest)
    if not len(df) or not {"generator_checkpoint", "sampler", "steps"} <= set(df.columns):
        return
    made = sorted({(str(g)[:12], str(s), int(n)) for g, s, n in
                   zip(df["generator_checkpoint"], df["sampler"], df["steps"])})
    this = (gen.sha256[:12], gen.sampler.label(), int(config.steps))
    if made != [this]:
        raise InputError(manifest, f"holds cases made by generator/sampler/steps {made}, not this run's {this}; "
                                   "use another output folder (or delete this one to make the cohort anew)",
                         kind="config-mismatch")


def _pending_jobs(written: pd.DataFrame | None, report_file: Path, rows: pd.DataFrame, indices: range,
                  case_prefix: str) -> tuple[list[_Job], list[dict]]:
    """The cases of ``indices`` not yet in the manifest ``written`` (None: none yet; a restarted run redoes the
    rest), and the quality report's rows of the finished ones."""
    done = set(written["case_id"]) if written is not None else set()
    report_rows = []
    if report_file.exists():  # keep only records of finished cases (the rest are redone)
        old = pd.read_csv(report_file)
        report_rows = old[old["case_id"].isin(done)].to_dict("records") if len(old) else []
    jobs = [job for job in (_job(i, rows, case_prefix) for i in indices) if job.case_id not in done]
    return jobs, report_rows


def _load_generator(gen_path: Path, config: SynthesisConfig, device: str) -> _Generator:
    # one thread: building the network and copying its weights gain nothing from more, and on a 2-core machine with
    # one core busy two threads took 75-180 ms against 18-21 ms (measured, the demo student)
    with torch_threads(1):
        model, cfg, meta = load_generator(gen_path)
    model.to(resolve_device(device))  # samples come back to the CPU (synth.schedulers.sample) before writing
    if config.sampler == DISTILLED:  # a distilled student samples as its card says, at its own step count
        from .distill import student_card

        student_steps = int(student_card(meta, gen_path)["student_steps"])
        if config.steps != student_steps:
            raise ConfigError(f"{gen_path} is a {student_steps}-step distilled student: sample it with steps "
                              f"{student_steps} (--steps {student_steps}, or leave --steps out), not {config.steps}")
        sampler = distilled_sampler(student_steps, NoiseSchedule.build(cfg.timesteps, cfg.schedule))
    else:
        sampler = make_sampler(config.sampler, cfg.timesteps, cfg.schedule, eta=config.eta, spacing=config.spacing,
                               analytic=config.analytic)
    sampler.timesteps(config.steps)  # refuses a step count outside 1..T before any work
    ranges = load_gate_ranges(gen_path.parent / RANGES_FILE, imported=SOURCE_META in meta)
    return _Generator(model, cfg, sampler, sha256_file(gen_path), ranges,
                      envelopes(ranges, config.gate_margin) if ranges is not None else None)


def _mask_rows(masks_manifest: Path, sources, splits, case_ids) -> pd.DataFrame:
    rows = select(load_manifest(masks_manifest), source=list(sources), split=None if splits is None else list(splits))
    if case_ids is not None:
        rows = rows[rows["case_id"].isin(list(case_ids)).to_numpy(dtype=bool, na_value=False)]
    if not len(rows):
        raise InputError(masks_manifest, f"no conditioning masks with source in {list(sources)}"
                                          f"{'' if splits is None else f' and split in {list(splits)}'}",
                          kind="empty-cohort")
    return rows.sort_values("case_id")


def _read_masks(masks_manifest: Path, jobs: list[_Job], cfg: MedDDPMConfig,
                checked: dict[Path, tuple[np.ndarray, np.ndarray]]) -> list[_Mask]:
    """The conditioning masks of a batch, each checked to lie on the generator's grid: those check_masks kept
    (``checked``) as it read them, the others read again."""
    grid = get_profile(cfg.profile)
    masks = []
    for job in jobs:
        lab_path = resolve(masks_manifest, job.mask_row["label"])  # case_files(...).label; check_masks checked the rest
        lab, aff = checked[lab_path] if lab_path in checked else read_label(lab_path)
        if lab.shape != grid.shape:
            raise InputError(lab_path, f"mask shape {lab.shape} is not the generator's grid {grid.shape} "
                                        f"(profile {cfg.profile})", kind="shape-mismatch")
        masks.append(_Mask(lab, aff))
    return masks


@contextlib.contextmanager
def _case_map():
    """A map over a batch's cases (results in order) for the work between network calls, the quality gate and
    writing the files: on as many threads as torch's intra-op ones, which are idle meanwhile. zlib and numpy's
    partitions (the gate's medians) release the GIL, so the cases run side by side; every byte written is the same."""
    n = torch.get_num_threads()
    if n <= 1:
        yield map
        return
    with ThreadPoolExecutor(n, thread_name_prefix="synthesize") as pool:
        yield pool.map


def _draw_until_pass(gen: _Generator, config: SynthesisConfig, jobs: list[_Job], masks: list[_Mask],
                     map_cases=map) -> tuple[list[_Draw], list[dict]]:
    """Sample each job's case on its mask, redrawing a sample the gate fails with the next attempt's seed up to
    ``max_retries`` times (first a draw for all, then only the failures, batched). Returns the draw each case keeps
    and the quality report's row of every attempt. map_cases: how the samples' gate checks are mapped (_case_map)."""
    cfg = gen.cfg
    cond = torch.stack([condition_from_label(mask.label, cfg.condition) for mask in masks])
    attempts = [0] * len(jobs)
    draws: list[_Draw | None] = [None] * len(jobs)
    report = []
    todo = list(range(len(jobs)))
    while todo:
        seeds = [case_seed(config.seed, jobs[k].index, attempts[k]) for k in todo]
        x = sample(gen.model, gen.sampler, cond[todo], cfg.out_channels, config.steps, seeds,
                   channels_last=cfg.channels_last, prediction=cfg.prediction).numpy()
        gate = list(map_cases(lambda image, label: check_sample(image, label, gen.ranges, cfg.modalities,
                                                                config.gate_margin, envs=gen.envelopes),
                              x, [masks[k].label for k in todo]))
        still = []
        for j, k in enumerate(todo):
            failures = gate[j]
            draws[k] = _Draw(x[j], failures, attempts[k], seeds[j])
            report.append({"case_id": jobs[k].case_id, "attempt": attempts[k], "seed": seeds[j],
                           "passed": not failures, "failures": "; ".join(failures)})
            if failures and attempts[k] < config.max_retries:
                attempts[k] += 1
                still.append(k)
        todo = still
    return draws, report


def _write_case(manifest: Path, job: _Job, mask: _Mask, draw: _Draw, gen: _Generator,
                config: SynthesisConfig) -> dict:
    """Write the case's images and its mask (unchanged) beside the manifest; return its manifest row."""
    cid, row = job.case_id, job.mask_row
    folder = manifest.parent / cid
    img_paths = {m: write_array(folder / f"{cid}_{m}.nii.gz", draw.image[ci], mask.affine)
                 for ci, m in enumerate(gen.cfg.modalities)}
    lab_path = write_array(folder / f"{cid}_seg.nii.gz", mask.label, mask.affine)
    is_edit = row["source"] == "mask"
    parent_of_mask = row.get("parent_case_id")
    origin = parent_of_mask if is_edit and not pd.isna(parent_of_mask) else row["case_id"]
    mask_edit = row.get("mask_edit")
    return make_row(
        manifest, case_id=cid, cohort=config.cohort_name, source="synthetic", split="train",
        images=img_paths, label=lab_path, shape=mask.label.shape, spacing=spacing_of(mask.affine),
        parent_case_id=row["case_id"], mask_edit=None if pd.isna(mask_edit) else mask_edit,
        mask_source=row["source"], origin_case_id=origin, generator_checkpoint=gen.sha256,
        sampler=gen.sampler.label(), steps=config.steps, seed=draw.seed,
        quality_gate="fail" if draw.failures else ("pass" if gen.ranges is not None else "unchecked"),
        attempts=draw.attempt + 1)


def shard_manifest_name(k: int, n: int) -> str:
    return f"data_manifest.shard-{k}-of-{n}.csv"


def shard_report_name(k: int, n: int) -> str:
    return f"quality_report.shard-{k}-of-{n}.csv"


def _resolve_shard(shard, device: str):
    """(k, n) or None, and the device; "auto" reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK."""
    import os

    if shard == "auto":
        k, n = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        if device == "auto" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
            device = f"cuda:{int(os.environ['LOCAL_RANK']) % torch.cuda.device_count()}"
        shard = (k, n)
    if shard is None:
        return None, device
    k, n = (int(v) for v in shard)
    if not (n >= 1 and 0 <= k < n):
        raise ConfigError(f"shard {k}/{n}: need 0 <= k < n")
    return (k, n), device


def merge_shards(out_dir: str | Path, n_shards: int, count: int) -> Path:
    """out_dir/data_manifest.csv (and quality_report.csv) from the n shard manifests of one synthesis, written
    atomically once every case 0..count-1 is there exactly once; a missing or unfinished shard is one clear error
    (rerun that shard: it resumes)."""
    out = Path(out_dir)
    frames, reports = [], []
    for k in range(n_shards):
        path = out / shard_manifest_name(k, n_shards)
        expected = len(range(k, count, n_shards))
        df = load_manifest(path) if path.exists() else None
        if df is None or len(df) != expected:
            raise InputError(path, f"shard {k} of {n_shards} has {0 if df is None else len(df)} of its {expected} "
                                    "cases; rerun it (it resumes) before merging", kind="incomplete-shard")
        frames.append(df)
        rep = out / shard_report_name(k, n_shards)
        if rep.exists() and rep.stat().st_size > len(REPORT_HEADER):
            reports.append(pd.read_csv(rep))
    merged = pd.concat(frames, ignore_index=True).sort_values("case_id", kind="stable")
    check_rows(merged, out / MANIFEST)
    write_manifest(merged, out / MANIFEST)
    atomic_write_text(out / REPORT_FILE, pd.concat(reports, ignore_index=True).sort_values(
        ["case_id", "attempt"]).to_csv(index=False) if reports else REPORT_HEADER)
    return out / MANIFEST

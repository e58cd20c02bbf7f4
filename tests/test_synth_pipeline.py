"""Med-DDPM training, sampling science and cohort synthesis on the toy cohort (tiny profile)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import InputError
from cohort.manifest import append_rows, case_files, load_manifest, make_row, validate_manifest
from cohort.nifti import read_array, read_label, write_array
from synth.checkpoint import STATE_FILE, load_generator, load_state
from synth.config import get_config
from synth.data import load_items, training_rows
from synth.network import build_unet, condition_from_label
from synth.schedulers import make_sampler, sample
from synth.synthesize import SynthesisConfig, synthesize_cohort
from synth.train import denoising_loss, train_medddpm
from tests.resume_helpers import kill_once_written, medddpm_command, run_to_end

FAST = {"num_threads": 1, "progress": False}  # one thread: the machine is shared, two threads thrash


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the machine is shared, 2 threads thrash


@pytest.fixture(scope="module")
def trained(toy_cohort, tmp_path_factory):
    """The tiny profile trained for its default 300 steps on the 6 real training cases."""
    out = tmp_path_factory.mktemp("medddpm_tiny")
    return train_medddpm(toy_cohort, "tiny", out, {**FAST, "checkpoint_every": 50})


@pytest.fixture(scope="module")
def val_items(toy_cohort, trained):
    _, cfg, _ = load_generator(trained)
    return load_items(toy_cohort, cfg, training_rows(toy_cohort, cfg, splits=("val",)))


def test_training_writes_resumable_state_and_a_loss_log(trained):
    out = trained.parent
    log = pd.read_csv(out / "loss_log.csv")
    assert log["step"].tolist() == list(range(1, 301))
    st = load_state(out / STATE_FILE)  # weights_only=True load
    assert st["step"] == 300 and st["config_hash"] == get_config("tiny").hash()
    assert {"model", "ema", "optimizer", "rng"} <= set(st)
    assert (out / "loss_curve.png").stat().st_size > 0 and (out / "intensity_ranges.json").exists()
    assert log["loss"].iloc[-30:].mean() < log["loss"].iloc[:10].mean()


def test_held_out_denoising_loss_falls_with_training(trained, val_items):
    model, cfg, _ = load_generator(trained)
    torch.manual_seed(cfg.seed)
    untrained = build_unet(cfg)
    before, after = denoising_loss(untrained, val_items, cfg), denoising_loss(model, val_items, cfg)
    assert after < 0.75 * before, (before, after)


@pytest.mark.parametrize("a_t", [1e-4, 0.3, 0.999])
def test_convert_model_output_recovers_eps_and_x0_from_either_prediction(a_t):
    from core.errors import ConfigError
    from synth.schedulers import convert_model_output, eps_from_output

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(2, 3, 4, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(2, 3, 4, 4, 4, generator=g, dtype=torch.float64)
    x_t = a_t ** 0.5 * x0 + (1 - a_t) ** 0.5 * eps
    v = a_t ** 0.5 * eps - (1 - a_t) ** 0.5 * x0  # Salimans & Ho's velocity
    for output, prediction in ((eps, "epsilon"), (v, "v")):
        eps_hat, x0_hat = convert_model_output(output, x_t, a_t, prediction)
        torch.testing.assert_close(eps_hat, eps)
        torch.testing.assert_close(x0_hat, x0, atol=1e-8 / a_t ** 0.5, rtol=1e-7)  # ε's x̂0 divides by √ᾱ
        assert torch.equal(eps_from_output(output, x_t, a_t, prediction), eps_hat)  # the samplers' ε̂, bit for bit
    assert eps_from_output(eps, x_t, a_t, "epsilon") is eps  # nothing computed for an ε-network
    for convert in (convert_model_output, eps_from_output):
        with pytest.raises(ConfigError, match="unknown prediction"):
            convert(eps, x_t, a_t, "x0")


def _medians(x: np.ndarray, lab: np.ndarray, ch: int, v: int) -> float:
    return float(np.median(x[:, ch][lab == v]))


def test_samples_show_the_training_contrast_direction(trained, val_items):
    """Toy data: ED bright on FLAIR, NCR dark on T1, each relative to normal brain. (ET, bright on T1CE, is a rim
    about one 9 mm voxel thick at this grid; the tiny model does not resolve it, see docs/medddpm.md.)"""
    model, cfg, _ = load_generator(trained)
    cond = torch.stack([it["condition"] for it in val_items])
    lab = np.stack([np.asarray(it["label"])[0] for it in val_items])
    x = sample(model, make_sampler("ddim"), cond, cfg.out_channels, 20, [11, 12]).numpy()
    t1, flair = (cfg.modalities.index(m) for m in ("t1", "flair"))
    assert _medians(x, lab, flair, 2) > _medians(x, lab, flair, 4) + 0.05   # FLAIR: edema > brain
    assert _medians(x, lab, t1, 1) < _medians(x, lab, t1, 4) - 0.05         # T1: necrosis < brain
    assert _medians(x, lab, flair, 0) < _medians(x, lab, flair, 4)          # background darkest


def test_samples_differ_where_masks_differ_and_agree_elsewhere(trained, val_items):
    model, cfg, _ = load_generator(trained)
    lab_a = np.asarray(val_items[0]["label"])[0]
    lab_b = lab_a.copy()
    lab_b[np.isin(lab_b, (1, 2, 3))] = 4  # same head, tumour removed
    changed = lab_a != lab_b
    from scipy.ndimage import binary_dilation

    far = (lab_a == 4) & ~binary_dilation(changed, iterations=2)
    cond = torch.stack([condition_from_label(lab_a, cfg.condition), condition_from_label(lab_b, cfg.condition)])
    x = sample(model, make_sampler("ddim"), cond, cfg.out_channels, 20, [5, 5]).numpy()
    diff = np.abs(x[0] - x[1]).mean(0)
    assert diff[changed].mean() > 2 * diff[far].mean()
    for c in range(cfg.out_channels):  # normal brain far from the tumour: same intensity distribution
        assert abs(np.median(x[0, c][far]) - np.median(x[1, c][far])) < 0.1


def _write_mask_rows(toy_cohort: Path, root: Path) -> Path:
    """A masks manifest with one real row and one edited (source=mask) row, as cohort.maskedit writes them."""
    df = load_manifest(toy_cohort)
    src = df[df["case_id"] == "toy_000"].iloc[0]
    lab, aff = read_label(case_files(toy_cohort, src).label)
    edited = np.roll(lab, 1, axis=0)
    manifest = root / "masks" / "data_manifest.csv"
    p_real = write_array(root / "masks" / "toy_000_seg.nii.gz", lab, aff)
    p_edit = write_array(root / "masks" / "toy_000_shift_seg.nii.gz", edited, aff)
    t1, t1_aff = read_array(case_files(toy_cohort, src).images["t1"])
    p_t1 = write_array(root / "masks" / "toy_000_t1.nii.gz", t1, t1_aff)
    rows = [make_row(manifest, case_id="toy_000", cohort="toy", source="real", split="train", images={"t1": p_t1},
                     label=p_real, shape=lab.shape, spacing=(9, 9, 9)),
            make_row(manifest, case_id="toy_000_shift", cohort="toy", source="mask", split="train", images={},
                     label=p_edit, shape=lab.shape, spacing=(9, 9, 9), parent_case_id="toy_000",
                     mask_edit="shift x+1")]
    append_rows(manifest, rows)
    return manifest


def test_synthetic_cohort_pairs_images_with_the_conditioning_masks_bit_for_bit(trained, toy_cohort, tmp_path,
                                                                               monkeypatch):
    masks = _write_mask_rows(toy_cohort, tmp_path)
    out = tmp_path / "synthetic"
    # interrupt after the first batch (as a kill between batches would), leaving a stray temp file
    import synth.synthesize as S

    real_append, calls = S.append_rows, []

    def flaky_append(path, rows, **kw):
        calls.append(1)
        if len(calls) == 2:
            (out / "syn00002_toy_000").mkdir(parents=True, exist_ok=True)
            (out / "syn00002_toy_000" / ".syn00002_toy_000_t1.abc.tmp.nii.gz").write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_append(path, rows, **kw)

    monkeypatch.setattr(S, "append_rows", flaky_append)
    config = SynthesisConfig(count=3, sampler="ddim", steps=5, seed=3, batch_size=2, progress=False, num_threads=1)
    with pytest.raises(KeyboardInterrupt):
        synthesize_cohort(trained, masks, out, config)
    monkeypatch.setattr(S, "append_rows", real_append)
    assert len(load_manifest(out / "data_manifest.csv")) == 2
    manifest = synthesize_cohort(trained, masks, out, config)
    df = validate_manifest(manifest)
    assert df["case_id"].tolist() == ["syn00000_toy_000", "syn00001_toy_000_shift", "syn00002_toy_000"]
    assert not list(out.rglob("*.tmp*"))
    assert set(df["source"]) == {"synthetic"} and set(df["sampler"]) == {"ddim(eta=1)"} and set(df["steps"]) == {"5"}
    assert df["parent_case_id"].tolist() == ["toy_000", "toy_000_shift", "toy_000"]
    assert df["mask_edit"].fillna("").tolist() == ["", "shift x+1", ""]
    assert df["origin_case_id"].tolist() == ["toy_000"] * 3
    assert df["mask_source"].tolist() == ["real", "mask", "real"]
    from core.fsutil import sha256_file

    assert set(df["generator_checkpoint"]) == {sha256_file(trained)}
    mdf = load_manifest(masks)
    for _, row in df.iterrows():
        cf = case_files(manifest, row)
        parent = mdf[mdf["case_id"] == row["parent_case_id"]].iloc[0]
        want, want_aff = read_label(case_files(masks, parent).label)
        got, got_aff = read_label(cf.label)
        assert got.dtype == want.dtype and np.array_equal(got, want)  # the mask, bit for bit
        np.testing.assert_array_equal(got_aff, want_aff)
        img, img_aff = read_array(cf.images["flair"])
        np.testing.assert_array_equal(img_aff, want_aff)
        assert img.shape == want.shape
    # a case depends only on its seed and mask: a fresh run with batch size 1 draws the same image
    # (equal up to float rounding; oneDNN kernels differ with batch size)
    again = synthesize_cohort(trained, masks, tmp_path / "again", dataclasses.replace(config, count=1, batch_size=1))
    a = read_array(case_files(again, load_manifest(again).iloc[0]).images["t2"])[0]
    b = read_array(case_files(manifest, df.iloc[0]).images["t2"])[0]
    np.testing.assert_allclose(a, b, atol=1e-3)
    report = pd.read_csv(out / "quality_report.csv")
    assert set(report["case_id"]) == set(df["case_id"])
    # the folder's cases are this sampler's: another sampler, step count or generator is refused, not resumed
    for other in (dataclasses.replace(config, count=4, steps=4), dataclasses.replace(config, count=4, sampler="ddpm")):
        with pytest.raises(InputError, match="holds cases made by generator/sampler/steps") as err:
            synthesize_cohort(trained, masks, out, other)
        assert str(out / "data_manifest.csv") in str(err.value)
    assert len(load_manifest(manifest)) == 3


def test_quality_gate_redraws_failures_and_reports_them(trained, toy_cohort, tmp_path):
    import json

    gen = tmp_path / "gen"
    gen.mkdir()
    (gen / "generator.safetensors").write_bytes(trained.read_bytes())
    ranges = json.loads((trained.parent / "intensity_ranges.json").read_text())
    ranges["labels"]["4"]["flair"] = {"mean": 5.5, "sd": 0.0, "min": 5.0, "max": 6.0, "n": 6}  # impossible

    (gen / "intensity_ranges.json").write_text(json.dumps(ranges))
    m = synthesize_cohort(gen / "generator.safetensors", toy_cohort, tmp_path / "out", SynthesisConfig(
        count=1, sampler="ddim", steps=4, max_retries=2, progress=False, num_threads=1))
    row = load_manifest(m).iloc[0]
    assert row["quality_gate"] == "fail" and row["attempts"] == "3"
    rep = pd.read_csv(tmp_path / "out" / "quality_report.csv")
    assert len(rep) == 3 and not rep["passed"].any() and rep["seed"].nunique() == 3
    # each failed check by name, with the measured value and the allowed range
    assert rep["failures"].str.contains(r"median brain/flair: -?\d\.\d{3} outside \[4\.950, 6\.050\]").all()


def test_cli_synthesize_passes_spacing_and_analytic_variance_to_the_sampler(trained, toy_cohort, tmp_path):
    """--spacing and --analytic-variance reach the sampler: the manifest records them, and the same seed gives a
    different image than the plain chain (the analytic step adds c²·Var[x0 | x_t] to each step's noise)."""
    from medddpm.cli import main

    images = {}
    for name, flags in (("plain", ["--no-analytic-variance"]), ("analytic", ["--analytic-variance"])):
        out = tmp_path / name
        assert main(["synthesize", "--checkpoint", str(trained), "--masks", str(toy_cohort), "--count", "1",
                     "--steps", "4", "--spacing", "quadratic", *flags, "--max-retries", "0", "--out", str(out),
                     "--threads", "1", "--no-progress"]) == 0
        row = load_manifest(out / "data_manifest.csv").iloc[0]
        assert row["sampler"] == ("analytic-ddim(eta=1)/quadratic" if name == "analytic" else "ddim(eta=1)/quadratic")
        images[name] = read_array(case_files(out / "data_manifest.csv", row).images["t1"])[0]
    assert not np.array_equal(images["plain"], images["analytic"])


def test_cli_train_resumes_after_sigkill_and_continues_the_loss_curve(toy_cohort, tmp_path):
    out = tmp_path / "run"
    cmd = medddpm_command("train", "--manifest", str(toy_cohort), "--profile", "tiny", "--out", str(out), "--steps",
                          "16", "--checkpoint-every", "4", "--threads", "1", "--no-progress")
    kill_once_written(cmd, out / STATE_FILE)
    killed_at = load_state(out / STATE_FILE)["step"]
    assert killed_at < 16
    run_to_end(cmd)
    log = pd.read_csv(out / "loss_log.csv")
    assert log["step"].tolist() == list(range(1, 17))  # no gap, no duplicate
    # the resumed curve equals an uninterrupted run (RNG, optimizer and data order are restored)
    ref = train_medddpm(toy_cohort, "tiny", tmp_path / "ref", {**FAST, "steps": 16, "checkpoint_every": 4})
    ref_log = pd.read_csv(ref.parent / "loss_log.csv")
    np.testing.assert_allclose(log["loss"], ref_log["loss"], rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="different config"):
        train_medddpm(toy_cohort, "tiny", out, {**FAST, "steps": 20, "lr": 1e-4})


def test_resume_refuses_a_changed_cosine_horizon_or_other_training_cases(toy_cohort, tmp_path):
    out = tmp_path / "run"
    cosine = {**FAST, "steps": 6, "checkpoint_every": 3, "lr_schedule": "cosine", "lr_min": 1e-4}
    train_medddpm(toy_cohort, "tiny", out, {**cosine, "steps": 4})  # a finished 4-step cosine run
    with pytest.raises(InputError, match=r"decays over --steps 4.*Resume with --steps 4"):
        train_medddpm(toy_cohort, "tiny", out, cosine)  # would move the lr horizon from 4 to 6
    # a constant lr has no horizon: more steps resume the same run
    const = tmp_path / "const"
    train_medddpm(toy_cohort, "tiny", const, {**FAST, "steps": 2, "checkpoint_every": 2})
    train_medddpm(toy_cohort, "tiny", const, {**FAST, "steps": 4, "checkpoint_every": 2})
    assert load_state(const / STATE_FILE)["step"] == 4
    # other training cases (here: one training row less) are refused
    df = load_manifest(toy_cohort)
    other = toy_cohort.parent / "fewer_cases.csv"
    df[df["case_id"] != "toy_000"].to_csv(other, index=False)
    with pytest.raises(InputError, match="trained on other cases"):
        train_medddpm(other, "tiny", const, {**FAST, "steps": 6, "checkpoint_every": 2})


def test_warmup_steps_ramp_the_lr_and_bad_settings_are_refused(toy_cohort, tmp_path):
    from core.errors import ConfigError
    from synth.train import lr_at

    cfg = get_config("tiny", warmup_steps=4, lr_schedule="cosine", lr_min=0.0, steps=8)
    lrs = [lr_at(cfg, s) for s in range(8)]
    assert lrs[:4] == pytest.approx([cfg.lr * k / 4 for k in (1, 2, 3, 4)])
    assert lrs[4] == pytest.approx(cfg.lr) and lrs[7] < lrs[5] < lrs[4]
    with pytest.raises(ConfigError, match="warmup_steps"):
        train_medddpm(toy_cohort, "tiny", tmp_path / "w", {**FAST, "steps": 3, "warmup_steps": 3})
    with pytest.raises(ConfigError, match="unknown lr_schedule"):
        get_config("tiny", lr_schedule="linear")
    with pytest.raises(ConfigError, match="no CUDA GPU|unknown device"):
        train_medddpm(toy_cohort, "tiny", tmp_path / "g", {**FAST, "steps": 3, "device": "cuda:7"})


def test_identical_runs_write_byte_identical_generators(toy_cohort, tmp_path):
    from core.fsutil import sha256_file

    a = train_medddpm(toy_cohort, "tiny", tmp_path / "a", {**FAST, "steps": 3, "checkpoint_every": 3})
    b = train_medddpm(toy_cohort, "tiny", tmp_path / "b", {**FAST, "steps": 3, "checkpoint_every": 3})
    assert sha256_file(a) == sha256_file(b)
    model, cfg, meta = load_generator(a)  # still a valid safetensors file with its metadata
    assert meta["step"] == "3" and cfg.hash() == get_config("tiny").hash()


def test_sharded_synthesis_merges_to_the_unsharded_cohort_and_resumes(trained, toy_cohort, tmp_path):
    from cohort.manifest import case_files
    from synth.synthesize import merge_shards, shard_manifest_name

    config = SynthesisConfig(count=5, sampler="ddim", steps=3, seed=2, progress=False, num_threads=1, max_retries=0)
    shard0, shard1 = (dataclasses.replace(config, shard=(k, 2)) for k in (0, 1))
    whole = load_manifest(synthesize_cohort(trained, toy_cohort, tmp_path / "whole", config))
    out = tmp_path / "sharded"
    synthesize_cohort(trained, toy_cohort, out, shard1)
    with pytest.raises(InputError, match="shard 0 of 2 has 0 of its 3 cases"):
        merge_shards(out, 2, 5)
    first = synthesize_cohort(trained, toy_cohort, out, shard0)
    assert first.name == shard_manifest_name(0, 2) and load_manifest(first)["case_id"].tolist() == \
        whole["case_id"].iloc[[0, 2, 4]].tolist()
    synthesize_cohort(trained, toy_cohort, out, shard0)  # rerun: resumes, nothing duplicated
    merged = load_manifest(merge_shards(out, 2, 5))
    assert merged["case_id"].tolist() == whole["case_id"].tolist()
    assert merged["seed"].tolist() == whole["seed"].tolist()
    for (_, a), (_, b) in zip(merged.iterrows(), whole.iterrows()):
        ia, ib = case_files(out / "data_manifest.csv", a), case_files(tmp_path / "whole" / "data_manifest.csv", b)
        for m in ia.images:  # same seed -> same sample, whatever the shard's batch partners: oneDNN picks other
            # kernels for other batch sizes, float differences of ~1e-4 grow a little over the steps
            np.testing.assert_allclose(read_array(ia.images[m])[0], read_array(ib.images[m])[0], atol=1e-3)
    assert len(pd.read_csv(out / "quality_report.csv")) == 5


def test_bf16_autocast_follows_the_fp32_loss_curve(toy_cohort, tmp_path):
    """Mixed precision (the GPU default) through its CPU autocast path: same draws, weights and EMA kept in fp32,
    so a short run's loss curve stays within bf16's precision of the fp32 one."""
    kw = {**FAST, "steps": 6, "checkpoint_every": 6}
    fp32 = train_medddpm(toy_cohort, "tiny", tmp_path / "fp32", {**kw, "precision": "fp32"})
    bf16 = train_medddpm(toy_cohort, "tiny", tmp_path / "bf16", {**kw, "precision": "bf16"})
    a = pd.read_csv(fp32.parent / "loss_log.csv")["loss"].to_numpy()
    b = pd.read_csv(bf16.parent / "loss_log.csv")["loss"].to_numpy()
    assert len(a) == len(b) == 6
    np.testing.assert_allclose(b, a, rtol=0.05)  # bf16 keeps 8 bits of mantissa: ~0.4 % per operation
    assert not np.array_equal(a, b)  # the autocast path really ran
    model, _, _ = load_generator(bf16)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the saved EMA weights are fp32

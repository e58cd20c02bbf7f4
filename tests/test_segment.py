"""MONAI segmenter back end behind segment.api: it learns, keeps geometry, is deterministic and resumes."""
from __future__ import annotations

import contextlib
import json

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import InputError, ConfigError
from cohort.manifest import read_case, load_manifest
from cohort.nifti import read_array
from segment import api, monai_backend
from segment.config import SegmenterConfig, load_config
from segment.data import to_target, training_data_hash
from tests.segment_helpers import mean_dice, mixed_manifest, odd_geometry_manifest, sha256_arrays, untrained_copy

TRAIN = ["toy_000", "toy_001", "toy_002", "toy_003", "toy_004", "toy_005"]


@pytest.fixture(scope="module")
def trained(toy_cohort, tmp_path_factory):
    """One tiny MONAI training (seed 0) and its predictions on the training cases."""
    root = tmp_path_factory.mktemp("seg_monai")
    model_dir = api.train(toy_cohort, "train", root / "model_a", SegmenterConfig(profile="tiny", seed=0))
    preds = api.predict(model_dir, toy_cohort, TRAIN, root / "pred_a")
    return model_dir, preds, root


@contextlib.contextmanager
def killed_after_epochs(monkeypatch, n: int):
    """The training inside is killed (KeyboardInterrupt) right after its n-th epoch's resume.pt is written, as a kill
    between epochs would; the real writer is back afterwards, so the next api.train resumes."""
    real_save, calls = monai_backend._save_resume, {"n": 0}

    def save_then_die(path, state):
        real_save(path, state)
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(monai_backend, "_save_resume", save_then_die)
    try:
        with pytest.raises(KeyboardInterrupt):
            yield
    finally:
        monkeypatch.setattr(monai_backend, "_save_resume", real_save)


def test_model_dir_holds_the_contract_files(trained, toy_cohort):
    model_dir, _, _ = trained
    for f in ("config.json", "training_data.json", "train_log.csv", "model.safetensors", "training_summary.json"):
        assert (model_dir / f).exists(), f
    assert not (model_dir / "resume.pt").exists()  # removed once training completed
    rec = json.loads((model_dir / "config.json").read_text())
    assert rec["train_ids"] == TRAIN and rec["val_ids"] == ["toy_006", "toy_007"]  # real val rows by default
    assert rec["training_data_hash"] == training_data_hash(toy_cohort, TRAIN)[0]
    assert rec["config"]["modalities"] == ["t1", "t1ce", "t2", "flair"]
    log = pd.read_csv(model_dir / "train_log.csv")
    assert list(log["epoch"]) == list(range(len(log))) and len(log) >= 1
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]


def test_training_data_hash_depends_on_cases_and_order_free(toy_cohort):
    h1, entries = training_data_hash(toy_cohort, TRAIN)
    assert h1 == training_data_hash(toy_cohort, list(reversed(TRAIN)))[0]
    assert h1 != training_data_hash(toy_cohort, TRAIN[:-1])[0]
    assert len(entries) == 6 * 5  # 4 modalities + label per case


def untrained_dice(model_dir, manifest, out_dir) -> tuple[float, float]:
    """mean_dice on the training cases of the same network and seed with its weights as initialised (baseline)."""
    base_dir = untrained_copy(model_dir, out_dir / "untrained", seed=load_config(model_dir).seed)
    return mean_dice(api.predict(base_dir, manifest, TRAIN, out_dir / "untrained_pred"), manifest)


def test_trained_model_beats_untrained(trained, toy_cohort, tmp_path):
    model_dir, preds, _ = trained
    lab_dice, wt_dice = mean_dice(preds, toy_cohort)
    base_lab, base_wt = untrained_dice(model_dir, toy_cohort, tmp_path)
    assert wt_dice > 0.6 and wt_dice > base_wt + 0.3, (wt_dice, base_wt)
    assert lab_dice > base_lab + 0.2, (lab_dice, base_lab)


def test_predictions_keep_geometry_and_label_range(trained, toy_cohort, tmp_path):
    model_dir, preds, _ = trained
    odd = odd_geometry_manifest(toy_cohort)  # 15x19x14 voxels (not divisible by 4), rotated affine
    out = api.predict(model_dir, odd, ["odd_000"], tmp_path)
    for manifest, p in [(odd, out), (toy_cohort, preds)]:
        df = load_manifest(manifest).set_index("case_id", drop=False)
        for cid, path in p.items():
            assert path.name == f"{cid}.nii.gz"
            case = read_case(manifest, df.loc[cid])
            vol, _ = case.image, case.label_map
            lab, aff = read_array(path)
            assert lab.shape == vol.shape and np.allclose(aff, vol.affine, atol=1e-5)
            assert set(np.unique(lab)) <= {0, 1, 2, 3}


def test_same_seed_same_predictions_and_resume_after_kill(trained, toy_cohort, monkeypatch):
    """Determinism: a second run with the same seed, killed after epoch 3 and rerun, predicts bit-identically."""
    model_a, preds_a, root = trained
    with killed_after_epochs(monkeypatch, 3):
        api.train(toy_cohort, "train", root / "model_b", SegmenterConfig(profile="tiny", seed=0))
    assert (root / "model_b" / "resume.pt").exists() and not (root / "model_b" / "model.safetensors").exists()
    with pytest.raises(InputError, match="not a finished"):
        api.predict(root / "model_b", toy_cohort, TRAIN, root / "pred_b")
    api.train(toy_cohort, "train", root / "model_b", SegmenterConfig(profile="tiny", seed=0))  # resumes at epoch 3
    preds_b = api.predict(root / "model_b", toy_cohort, TRAIN, root / "pred_b")
    assert sha256_arrays(preds_b) == sha256_arrays(preds_a)
    assert (root / "model_b" / "model.safetensors").read_bytes() == (model_a / "model.safetensors").read_bytes()
    log_b = pd.read_csv(root / "model_b" / "train_log.csv")
    assert list(log_b["epoch"]) == list(pd.read_csv(model_a / "train_log.csv")["epoch"])


def test_cli_train_predict_other_seed_differs(trained, toy_cohort):
    from medddpm.cli import main

    model_a, preds_a, root = trained
    rc = main(["segment-train", "--manifest", str(toy_cohort), "--split", "train", "--out", str(root / "model_c"),
               "--backend", "monai", "--profile", "tiny", "--seed", "1", "--epochs", "4"])
    assert rc == 0
    rc = main(["segment-predict", "--model", str(root / "model_c"), "--manifest", str(toy_cohort),
               "--cases", *TRAIN, "--out", str(root / "pred_c")])
    assert rc == 0
    preds_c = {c: root / "pred_c" / f"{c}.nii.gz" for c in TRAIN}
    assert sha256_arrays(preds_c) != sha256_arrays(preds_a)


def test_rerun_is_cached_and_different_config_refused(trained, toy_cohort):
    model_dir, _, _ = trained
    before = (model_dir / "model.safetensors").stat().st_mtime_ns
    assert api.train(toy_cohort, "train", model_dir, SegmenterConfig(profile="tiny", seed=0)) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before
    with pytest.raises(InputError) as e:
        api.train(toy_cohort, "train", model_dir, SegmenterConfig(profile="tiny", seed=7))
    assert e.value.kind == "model-mismatch" and "config.json" in str(e.value)
    # where a training runs is not part of what it is: the finished model is reused from another device setting
    assert api.train(toy_cohort, "train", model_dir, SegmenterConfig(profile="tiny", seed=0, device="cpu")) == model_dir
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == before


def test_device_is_explicit_and_a_missing_gpu_is_one_clear_error(trained, toy_cohort, tmp_path):
    from core.fsutil import sha256_file

    model_dir, preds, _ = trained
    again = api.predict(model_dir, toy_cohort, TRAIN[:2], tmp_path / "cpu", device="cpu")
    for cid, p in again.items():
        assert sha256_file(p) == sha256_file(preds[cid])
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            api.predict(model_dir, toy_cohort, TRAIN[:1], tmp_path / "gpu", device="cuda")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            api.train(toy_cohort, TRAIN[:2], tmp_path / "m", SegmenterConfig(profile="tiny", device="cuda:0"))


def test_validation_is_real_only(toy_cohort, tmp_path):
    mixed = mixed_manifest(toy_cohort)
    rec_dir = tmp_path / "m"
    with pytest.raises(InputError, match="validation cases must be real"):
        api.train(mixed, ["toy_000", "syn_001"], rec_dir, SegmenterConfig(profile="tiny", val_ids=["syn_000"]))
    from segment.data import validation_ids

    # default: real val-split rows only, although syn_000 is marked split=val
    assert validation_ids(mixed, ["toy_000", "syn_001"], None) == ["toy_006", "toy_007"]
    with pytest.raises(InputError, match="not in the manifest"):
        api.train(mixed, ["nope"], rec_dir, SegmenterConfig(profile="tiny"))


def test_encoder_features(trained, toy_cohort):
    model_dir, _, _ = trained
    df = load_manifest(toy_cohort).set_index("case_id", drop=False)
    case = read_case(toy_cohort, df.loc["toy_000"])
    vol0, _ = case.image, case.label_map
    case = read_case(toy_cohort, df.loc["toy_008"])
    vol8, _ = case.image, case.label_map
    loaded = monai_backend.load_model(model_dir)
    f0 = monai_backend.encoder_features(model_dir, vol0)
    assert f0.ndim == 1 and f0.shape[0] == loaded[1].init_filters * 2 ** (len(loaded[1].blocks_down) - 1)
    assert np.isfinite(f0).all()
    np.testing.assert_array_equal(f0, monai_backend.encoder_features(loaded, vol0))
    arr = np.stack([vol0.channel(m) for m in loaded[1].modalities])
    np.testing.assert_allclose(f0, monai_backend.encoder_features(loaded, arr), rtol=1e-6)
    assert not np.allclose(f0, monai_backend.encoder_features(loaded, vol8))
    assert not hasattr(api, "encoder_features")  # MONAI-only functions are not part of the shared interface


def test_backends_are_a_registry():
    from segment.config import BACKENDS

    assert BACKENDS == ("monai", "nnunet")
    for name in BACKENDS:
        module = api.backend(name)
        assert callable(module.train) and callable(module.predict), name
    assert api.backend("monai") is monai_backend


def test_brain_label_is_background():
    lab = np.array([0, 1, 2, 3, 4], np.uint8)
    assert to_target(lab).tolist() == [0, 1, 2, 3, 0]
    with pytest.raises(ConfigError, match="unknown segmenter backend"):
        SegmenterConfig(backend="x").resolved()


def test_paper_profile_shapes_without_training():
    """Paper-size MONAI config is shape-checked on the meta device (no memory, no compute)."""
    cfg = SegmenterConfig(profile="paper", modalities=["t1", "t1ce", "t2", "flair"]).resolved()
    assert cfg.patch_size == (128, 128, 128) and cfg.epochs * cfg.iters_per_epoch == 300 * 250
    with torch.device("meta"):
        net = monai_backend.build_network(cfg, 4)
        out = net(torch.empty(2, 4, *cfg.patch_size))
    assert tuple(out.shape) == (2, 4, 128, 128, 128)
    assert monai_backend._roi_size(cfg, (192, 192, 144)) == (128, 128, 128)
    nn = SegmenterConfig(backend="nnunet", profile="paper").resolved()
    assert nn.trainer == "nnUNetTrainer" and (nn.epochs, nn.iters_per_epoch) == (1000, 250)


def test_parallel_trainings_in_threads_start_from_their_own_seed(toy_cohort, tmp_path, monkeypatch):
    """Two trainings in threads (as the study runs them) give the same weights as each alone. The network init is
    slowed down here so that the first training's per-epoch reseed of torch's global RNG falls inside the second
    one's init: before the reseed took the init lock, the second training started from other weights (its first
    epoch's loss differed: the study's real-only seed 1 scored TC 0.72 in one run and 0.77 in the next)."""
    import threading
    import time

    real_build = monai_backend.build_network

    def slow_build(cfg, in_channels):
        torch.rand(1)  # a draw before the pause, a network after it: both from the seeded global RNG
        time.sleep(0.5)
        return real_build(cfg, in_channels)

    monkeypatch.setattr(monai_backend, "build_network", slow_build)
    cfg = dict(profile="tiny", epochs=3)
    alone = api.train(toy_cohort, "train", tmp_path / "alone_s1", SegmenterConfig(seed=1, **cfg))
    runs = [threading.Thread(target=api.train, args=(toy_cohort, "train", tmp_path / f"par_s{seed}",
                                                      SegmenterConfig(seed=seed, **cfg))) for seed in (0, 1)]
    runs[0].start()
    time.sleep(0.1)  # seed 0 initialises first; seed 1 waits for the lock and initialises while seed 0 trains
    runs[1].start()
    for t in runs:
        t.join()
    assert (tmp_path / "par_s1" / "model.safetensors").read_bytes() == (alone / "model.safetensors").read_bytes()


def test_dynunet_learns_saves_and_gives_encoder_features(toy_cohort, tmp_path):
    """The nnU-Net-like DynUNet option: trains through the same API (its aliased weights survive safetensors, and
    saving them again gives the same bytes), beats its own untrained weights on the training cases, and exposes
    bottleneck features of the right size."""
    cfg = SegmenterConfig(profile="tiny", seed=0, network="dynunet")
    model_dir = api.train(toy_cohort, "train", tmp_path / "dyn", cfg)
    model, rcfg = monai_backend.load_model(model_dir)
    assert type(model).__name__ == "DynUNet" and rcfg.network == "dynunet" and rcfg.init_filters == 8
    # the same weights make the same file, byte for byte (safetensors' save_model wrote its alias map in a random
    # order, so every save of one DynUNet had another hash)
    for i in range(2):
        monai_backend._save_safetensors(model, tmp_path / f"again{i}.safetensors")
        assert (tmp_path / f"again{i}.safetensors").read_bytes() == (model_dir / "model.safetensors").read_bytes()
    _, wt_dice = mean_dice(api.predict(model_dir, toy_cohort, TRAIN, tmp_path / "pred"), toy_cohort)
    assert wt_dice > 0.6 and wt_dice > untrained_dice(model_dir, toy_cohort, tmp_path / "base")[1] + 0.3
    case = read_case(toy_cohort, load_manifest(toy_cohort).set_index("case_id", drop=False).loc["toy_000"])
    vol, _ = case.image, case.label_map
    f = monai_backend.encoder_features((model, rcfg), vol)
    assert f.shape == (rcfg.init_filters * 2 ** (len(rcfg.blocks_down) - 1),) and np.isfinite(f).all()
    with pytest.raises(ConfigError, match="unknown MONAI network"):
        SegmenterConfig(network="vnet").resolved()


def test_nnunet_augmentation_moves_image_and_label_together():
    """augment="nnunet" rotates/scales image and label with one transform (nearest for the label: labels stay
    labels), keeps the shape, and changes intensities only of the image; an unknown name is refused."""
    rng = np.random.default_rng(0)
    label = np.zeros((1, 16, 20, 16), np.float32)
    label[0, 4:10, 6:14, 5:11] = 2
    label[0, 6:8, 8:12, 7:9] = 3
    image = np.concatenate([label * 0.5 + rng.normal(0, 0.05, label.shape).astype(np.float32)] * 2)
    cfg = SegmenterConfig(profile="tiny", augment="nnunet").resolved()
    tf = monai_backend.train_transforms(cfg)
    moved = 0
    for seed in range(40):
        tf.set_random_state(seed)
        out = tf({"image": image.copy(), "label": label.copy()})
        img, lab = np.asarray(out["image"]), np.asarray(out["label"])
        assert img.shape == image.shape and lab.shape == label.shape
        assert set(np.unique(lab)) <= {0.0, 2.0, 3.0}
        moved += not np.array_equal(lab, label)
        core = lab[0] == 3  # the image follows the label: the core stays the brightest structure
        assert img[0][core].mean() > img[0][lab[0] == 0].mean() + 0.5
    assert moved >= 20  # flips on 3 axes and affine moves: most draws move the label
    light = SegmenterConfig(profile="tiny").resolved()
    assert light.augment == "light" and SegmenterConfig(profile="demo").resolved().augment == "light"
    with pytest.raises(ConfigError, match="unknown augmentation"):
        SegmenterConfig(augment="heavy").resolved()


def test_preload_imports_everything_that_threads_would_import(toy_cohort, tmp_path):
    """Regression: the study's first segmenter training and a prediction, started in two threads of a fresh
    process, imported MONAI at the same time and one failed on a half-initialised module (KeyError: 'monai').
    After segment.api.preload, a training, a prediction and the evaluation import no MONAI module of their own."""
    import subprocess
    import sys

    script = f"""
import sys
import eval.segmentation
from segment import api
from segment.config import SegmenterConfig
api.preload(["monai"])
before = {{m for m in sys.modules if m.split(".")[0] == "monai"}}
cfg = SegmenterConfig(profile="tiny", seed=0, epochs=1, iters_per_epoch=1)
model = api.train({str(toy_cohort)!r}, ["toy_000", "toy_001"], {str(tmp_path / "m")!r}, cfg)
preds = api.predict(model, {str(toy_cohort)!r}, ["toy_006"], {str(tmp_path / "p")!r})
eval.segmentation.evaluate_predictions(preds, {str(toy_cohort)!r})
new = sorted(m for m in sys.modules if m.split(".")[0] == "monai" and m not in before)
print("NEW", new)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NEW []" in out.stdout, out.stdout[-3000:]


@pytest.mark.slow  # default-suite budget (15 min on 2 cores): CI runs it with -m slow
def test_weight_average_is_what_is_saved_and_resumes_exactly(trained, toy_cohort, tmp_path, monkeypatch):
    """ema_decay > 0: the optimiser's path is the same (same losses as without it), the saved weights are the
    moving average (another file), and a run killed after epoch 3 resumes to the same bytes. ema_decay 0 is the old
    recipe: left out of config.json and of the hash."""
    model_a, _, _ = trained
    cfg = SegmenterConfig(profile="tiny", seed=0, ema_decay=0.9)
    ema_dir = api.train(toy_cohort, "train", tmp_path / "ema", cfg)
    log, log_a = pd.read_csv(ema_dir / "train_log.csv"), pd.read_csv(model_a / "train_log.csv")
    assert list(log["train_loss"]) == list(log_a["train_loss"])
    assert (ema_dir / "model.safetensors").read_bytes() != (model_a / "model.safetensors").read_bytes()
    assert load_config(ema_dir).ema_decay == 0.9 and "ema_decay" not in json.loads(
        (model_a / "config.json").read_text())["config"]
    with killed_after_epochs(monkeypatch, 3):
        api.train(toy_cohort, "train", tmp_path / "ema_b", cfg)
    api.train(toy_cohort, "train", tmp_path / "ema_b", cfg)
    assert (tmp_path / "ema_b" / "model.safetensors").read_bytes() == (ema_dir / "model.safetensors").read_bytes()

"""nnU-Net v2 back end behind segment.api (real nnunetv2, tiny trainer on CPU): export keeps validation real,
the model learns, predictions keep geometry, model_dir holds the same files as the MONAI back end."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cohort.manifest import read_case, load_manifest
from cohort.nifti import read_array
from segment import api, nnunet_backend
from segment.config import NNUNET_BUDGETS, SegmenterConfig
from tests.segment_helpers import mean_dice, mixed_manifest, untrained_copy

REAL_TRAIN = ["toy_000", "toy_001", "toy_002", "toy_003"]
SYNTH = ["syn_000", "syn_001", "syn_002"]


@pytest.fixture(scope="module")
def nn_trained(toy_cohort, tmp_path_factory):
    mixed = mixed_manifest(toy_cohort)
    root = tmp_path_factory.mktemp("seg_nnunet")
    model_dir = api.train(mixed, REAL_TRAIN + SYNTH, root / "model", SegmenterConfig(backend="nnunet", profile="tiny"))
    preds = api.predict(model_dir, mixed, REAL_TRAIN + ["odd_000"], root / "pred")
    return mixed, model_dir, preds, root


def test_export_never_validates_on_synthetic_cases(nn_trained):
    mixed, model_dir, _, _ = nn_trained
    r = nnunet_backend.roots(model_dir)
    case_map = pd.read_csv(r["raw"] / nnunet_backend.DATASET / "case_map.csv", dtype=str).set_index("nnunet_case")
    src = load_manifest(mixed).set_index("case_id")["source"]
    for splits_path in (r["raw"] / nnunet_backend.DATASET / "splits_final.json",
                        r["preprocessed"] / nnunet_backend.DATASET / "splits_final.json"):  # the one nnU-Net reads
        splits = json.loads(splits_path.read_text())
        for fold in splits:
            assert all(src[case_map.loc[n, "case_id"]] == "real" for n in fold["val"]), splits_path
        fold0 = splits[0]
        assert sorted(case_map.loc[n, "case_id"] for n in fold0["val"]) == ["toy_006", "toy_007"]
        assert set(SYNTH) <= {case_map.loc[n, "case_id"] for n in fold0["train"]}  # syn_000 (split=val) trains
    # nnU-Net itself validated on exactly those two real cases
    val_dir = nnunet_backend.trained_model_folder(model_dir, "nnUNetTrainer_segtiny") / "fold_0" / "validation"
    validated = sorted(case_map.loc[p.name.removesuffix(".nii.gz"), "case_id"] for p in val_dir.glob("*.nii.gz"))
    assert validated == ["toy_006", "toy_007"]


def test_budget_trainer_found_via_ext_trainer_path_and_contract_files(nn_trained):
    _, model_dir, _, _ = nn_trained
    for f in ("config.json", "training_data.json", "train_log.csv", "model.safetensors", "training_summary.json"):
        assert (model_dir / f).exists(), f
    log = pd.read_csv(model_dir / "train_log.csv")
    assert len(log) == 4  # nnUNetTrainer_segtiny: 4 epochs
    assert log["train_loss"].iloc[-1] < log["train_loss"].iloc[0]
    from safetensors.torch import load_file

    weights = load_file(str(model_dir / "model.safetensors"))
    assert any(k.startswith("encoder.") for k in weights)
    # what only a working nnU-Net run leaves: nnU-Net's own message that it found our trainer class in our folder
    # (the command line the backend logs names the trainer too, so the trainer name alone proves nothing), and
    # its final checkpoint, written by that trainer after exactly the tiny budget's epochs
    train_log = (nnunet_backend.roots(model_dir)["base"] / "logs" / "train.log").read_text()
    assert f"Using trainer 'nnUNetTrainer_segtiny' from: {nnunet_backend.TRAINER_DIR}" in train_log
    ckpt = nnunet_backend.load_checkpoint(nnunet_backend.final_checkpoint(model_dir, "nnUNetTrainer_segtiny"))
    assert ckpt["trainer_name"] == "nnUNetTrainer_segtiny"
    assert ckpt["current_epoch"] == NNUNET_BUDGETS["tiny"]["epochs"] == len(ckpt["logging"]["train_losses"])
    rec = json.loads((model_dir / "config.json").read_text())
    assert rec["config"]["backend"] == "nnunet" and rec["val_ids"] == ["toy_006", "toy_007"]


def test_nnunet_learns_and_keeps_geometry(nn_trained, tmp_path):
    mixed, model_dir, preds, _ = nn_trained
    trained_lab, trained_wt = mean_dice({c: preds[c] for c in REAL_TRAIN}, mixed)
    untrained = api.predict(untrained_copy(model_dir, tmp_path / "untrained", seed=0), mixed, REAL_TRAIN,
                            tmp_path / "pred")
    base_lab, base_wt = mean_dice(untrained, mixed)
    assert trained_wt > 0.6 and trained_wt > base_wt + 0.3, (trained_wt, base_wt)
    assert trained_lab > base_lab + 0.2, (trained_lab, base_lab)
    df = load_manifest(mixed).set_index("case_id", drop=False)
    for cid, path in preds.items():  # includes odd_000: 15x19x14 voxels, rotated affine
        case = read_case(mixed, df.loc[cid])
        vol, _ = case.image, case.label_map
        lab, aff = read_array(path)
        assert lab.shape == vol.shape and np.allclose(aff, vol.affine, atol=1e-5), cid
        assert set(np.unique(lab)) <= {0, 1, 2, 3}


@pytest.mark.slow
def test_fine_tuning_transfers_the_plans_and_starts_from_the_weights(nn_trained, tmp_path):
    """The staged arm on nnU-Net: the fine-tuning dataset is preprocessed with the pretrained model's plans moved over
    by nnU-Net's move_plans_between_datasets (its intensity normalisation comes from the pre-training data, not
    from its own fingerprint), and nnU-Net loads the pretrained weights before its first epoch."""
    from safetensors.torch import load_file

    mixed, pre_dir, _, _ = nn_trained
    cfg = SegmenterConfig(backend="nnunet", profile="tiny", **api.pretrained_init(pre_dir))
    tuned = api.train(mixed, REAL_TRAIN, tmp_path / "tuned", cfg)
    plans_of = lambda d: json.loads(  # noqa: E731
        (nnunet_backend.roots(d)["preprocessed"] / nnunet_backend.DATASET / "nnUNetPlans.json").read_text())
    own_fingerprint = json.loads((nnunet_backend.roots(tuned)["preprocessed"] / nnunet_backend.DATASET
                                  / "dataset_fingerprint.json").read_text())
    assert plans_of(tuned) == plans_of(pre_dir)
    key = "foreground_intensity_properties_per_channel"
    assert plans_of(tuned)[key] != own_fingerprint[key]  # planning anew would have taken these
    ckpt = nnunet_backend.load_checkpoint(nnunet_backend.roots(tuned)["base"] / "pretrained_weights.pth")
    pre_w = load_file(str(pre_dir / "model.safetensors"))
    assert set(ckpt["network_weights"]) == set(pre_w)
    assert all(np.array_equal(ckpt["network_weights"][k].numpy(), pre_w[k].numpy()) for k in pre_w)
    log = (nnunet_backend.roots(tuned)["base"] / "logs" / "train.log").read_text()
    assert "Loading pretrained weights from file" in log and "pretrained_weights.pth" in log
    preds = api.predict(tuned, mixed, ["toy_006"], tmp_path / "pred")  # the transferred plans predict too
    assert read_array(preds["toy_006"])[0].shape == read_case(mixed, load_manifest(mixed).set_index(
        "case_id", drop=False).loc["toy_006"]).image.shape

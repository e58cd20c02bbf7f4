"""The generator the project ships for the demo study (synth/pretrained.py): intact, trained, and fine-tuned by the
study."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from core.errors import InputError, ConfigError
from flows.plan import StudyParams
from flows.study import generator_init
from synth import pretrained


def test_the_shipped_demo_generator_matches_its_card():
    path = pretrained.shipped_generator("demo")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["profile"] == "demo" and card["pretrain_cohort"] == pretrained.PRETRAIN_COHORT
    assert card["pretrain_cohort"]["seed"] != StudyParams().cohort_seed  # not the study's cohort
    assert pretrained.shipped_generator("tiny") is None  # nothing ships for the unit-test profile


def test_a_changed_or_missing_shipped_file_is_refused(tmp_path, monkeypatch):
    src = pretrained.SHIPPED_DIR / pretrained.SHIPPED["demo"]
    monkeypatch.setattr(pretrained, "SHIPPED_DIR", tmp_path)
    with pytest.raises(InputError, match="missing"):
        pretrained.shipped_generator("demo")
    shutil.copyfile(src.with_suffix(".json"), tmp_path / src.with_suffix(".json").name)
    (tmp_path / src.name).write_bytes(src.read_bytes()[:-1] + b" ")
    with pytest.raises(InputError, match="sha256"):
        pretrained.shipped_generator("demo")


def test_the_shipped_generator_denoises_phantom_cases_better_than_its_untrained_network(tmp_path):
    """The weights are trained: on two phantom cases of another seed than its pre-training cohort, its held-out
    denoising loss is well below that of the same network freshly initialised."""
    from cohort.phantom import build_phantom_cohort
    from synth.checkpoint import load_generator
    from synth.data import load_items, training_rows
    from synth.network import build_unet
    from synth.train import denoising_loss

    manifest = build_phantom_cohort(tmp_path / "c", n_cases=2, seed=7, profile="demo")
    model, cfg, _ = load_generator(pretrained.shipped_generator("demo"))
    items = load_items(manifest, cfg, training_rows(manifest, cfg, splits=("train", "val", "test")))
    torch.manual_seed(0)
    untrained = build_unet(cfg)
    trained_loss = denoising_loss(model, items, cfg, n_draws=6)
    untrained_loss = denoising_loss(untrained, items, cfg, n_draws=6)
    assert trained_loss < 0.5 * untrained_loss, (trained_loss, untrained_loss)


def test_the_study_fine_tunes_the_shipped_generator_where_one_ships():
    shipped = generator_init(StudyParams(profile="demo"))
    assert shipped["init_from"] == str(pretrained.shipped_generator("demo"))
    assert shipped["steps"] == pretrained.FINE_TUNE["demo"]["steps"]
    assert generator_init(StudyParams(profile="demo", medddpm_init="scratch")) == {}
    assert generator_init(StudyParams(profile="tiny")) == {}  # none ships: from scratch
    with pytest.raises(ConfigError, match="fine-tuning recipe"):
        pretrained.fine_tune_config("paper-brats", "x.safetensors")

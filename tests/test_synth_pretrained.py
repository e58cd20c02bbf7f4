"""The generator the project ships for the demo study (synth/shipped.py): intact, trained, and fine-tuned by the
study."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from core.errors import InputError, ConfigError
from flows.plan import StudyParams
from flows.study import generator_init
from synth import shipped


def test_the_shipped_demo_generator_matches_its_card():
    path = shipped.shipped_generator("demo")
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["profile"] == "demo" and card["pretrain_cohort"] == shipped.PRETRAIN_COHORT
    assert card["pretrain_cohort"]["seed"] != StudyParams().cohort_seed  # not the study's cohort
    assert shipped.shipped_generator("tiny") is None  # nothing ships for the unit-test profile


def test_the_shipped_generators_config_reproduces_its_cards_config_hash():
    """The config in the generator's metadata, with the sha256 of the file its run started from (init_from),
    gives the config hash its card records: the hash is computed from the config alone, never from a file."""
    from safetensors import safe_open

    from synth.config import MedDDPMConfig

    path = shipped.shipped_generator("demo")
    card = json.loads(path.with_suffix(".json").read_text())
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    cfg = MedDDPMConfig.from_dict(json.loads(meta["config"]))
    assert cfg.init_from and cfg.init_from_sha256 is None  # written before the config carried the sha256
    assert cfg.replace(init_from_sha256=card["starts_from"]["sha256"]).hash() == card["config_hash"]
    assert meta["config_hash"] == card["config_hash"] != cfg.hash()


def test_only_the_shipped_generators_and_their_cards_are_package_data():
    """pyproject.toml installs exactly the files SHIPPED names (with their cards), so a new version ships by
    changing both together."""
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]
    folder = shipped.SHIPPED_DIR.name
    want = {f"{folder}/{name}" for gen in shipped.SHIPPED.values()
            for name in (gen, Path(gen).with_suffix(".json").name)}
    assert set(data) == {"synth"} and set(data["synth"]) == want
    assert all((shipped.SHIPPED_DIR.parent / f).is_file() for f in want)


def test_a_changed_or_missing_shipped_file_is_refused(tmp_path, monkeypatch):
    src = shipped.SHIPPED_DIR / shipped.SHIPPED["demo"]
    monkeypatch.setattr(shipped, "SHIPPED_DIR", tmp_path)
    with pytest.raises(InputError, match="missing"):
        shipped.shipped_generator("demo")
    shutil.copyfile(src.with_suffix(".json"), tmp_path / src.with_suffix(".json").name)
    (tmp_path / src.name).write_bytes(src.read_bytes()[:-1] + b" ")
    with pytest.raises(InputError, match="sha256"):
        shipped.shipped_generator("demo")


def test_the_shipped_generator_denoises_phantom_cases_better_than_its_untrained_network(tmp_path):
    """The weights are trained: on two phantom cases of another seed than its pre-training cohort, its held-out
    denoising loss is well below that of the same network freshly initialised."""
    from cohort.phantom import build_phantom_cohort
    from synth.checkpoint import load_generator
    from synth.data import load_items, training_rows
    from synth.network import build_unet
    from synth.train import denoising_loss

    manifest = build_phantom_cohort(tmp_path / "c", n_cases=2, seed=7, profile="demo")
    model, cfg, _ = load_generator(shipped.shipped_generator("demo"))
    items = load_items(manifest, cfg, training_rows(manifest, cfg, splits=("train", "val", "test")))
    torch.manual_seed(0)
    untrained = build_unet(cfg)
    trained_loss = denoising_loss(model, items, cfg, n_draws=6)
    untrained_loss = denoising_loss(untrained, items, cfg, n_draws=6)
    assert trained_loss < 0.5 * untrained_loss, (trained_loss, untrained_loss)


def test_the_study_fine_tunes_the_shipped_generator_where_one_ships():
    init = generator_init(StudyParams(profile="demo"))
    assert init["init_from"] == str(shipped.shipped_generator("demo"))
    assert init["steps"] == shipped.FINE_TUNE["demo"]["steps"]
    assert generator_init(StudyParams(profile="demo", medddpm_init="scratch")) == {}
    assert generator_init(StudyParams(profile="tiny")) == {}  # none ships: from scratch
    with pytest.raises(ConfigError, match="fine-tuning recipe"):
        shipped.fine_tune_config("paper-brats", "x.safetensors")

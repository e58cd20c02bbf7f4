"""The quality gate (synth.quality) on the phantom: held-out real cases pass, noisy or grey-background samples
fail, and each failure names its check, value and allowed range."""
from __future__ import annotations

import json

import numpy as np
import pytest

from synth.config import get_config
from synth.data import load_items, training_rows
from synth.quality import check_sample, intensity_ranges, load_ranges, save_ranges


@pytest.fixture(scope="module")
def phantom_items(tmp_path_factory):
    """The demo phantom (40 cases): gate statistics of the real training cases, and the held-out real cases, both
    in the generator's model space (synth's training transforms)."""
    from cohort.phantom import build_phantom_cohort

    manifest = build_phantom_cohort(tmp_path_factory.mktemp("gate_phantom"), n_cases=40, seed=5, profile="demo",
                                    progress=False)
    cfg = get_config("demo")
    train = load_items(manifest, cfg, training_rows(manifest, cfg))
    held = load_items(manifest, cfg, training_rows(manifest, cfg, splits=("val", "test")))
    return intensity_ranges(train, cfg.modalities), held, cfg.modalities


def _arrays(item):
    return np.asarray(item["image"]), np.asarray(item["label"])[0]


def test_held_out_real_phantom_cases_pass_the_gate(phantom_items):
    gate, held, mods = phantom_items
    assert len(held) >= 10
    passed = [not check_sample(*_arrays(it), gate, mods) for it in held]
    assert np.mean(passed) >= 0.95, [check_sample(*_arrays(it), gate, mods) for it in held]


def test_added_noise_fails_the_texture_check(phantom_items):
    gate, held, mods = phantom_items
    rng = np.random.default_rng(0)
    for it in held:
        img, lab = _arrays(it)
        noisy = np.clip(img + rng.normal(0, 0.2, img.shape), -1, 1).astype(np.float32)
        failures = check_sample(noisy, lab, gate, mods)
        assert any(f.startswith("texture brain/") for f in failures), failures


def test_grey_background_fails_the_background_check(phantom_items):
    gate, held, mods = phantom_items
    img, lab = _arrays(held[0])
    grey = np.where(lab[None] == 0, -0.3, img).astype(np.float32)
    failures = check_sample(grey, lab, gate, mods)
    assert len([f for f in failures if f.startswith("background background/")]) == len(mods)
    f = next(f for f in failures if f.startswith("background background/t1:"))
    lo, hi = (float(v) for v in f.split("[")[1].rstrip("]").split(","))
    assert f.split(": ")[1].startswith("-0.300") and lo <= -1.0 <= hi < -0.3  # value and the allowed range


def test_wrong_contrast_fails_the_median_check(phantom_items):
    gate, held, mods = phantom_items
    img, lab = _arrays(held[0])
    flipped = img.copy()
    ed = lab == 2
    flipped[mods.index("flair"), ed] = -flipped[mods.index("flair"), ed]  # oedema dark on FLAIR
    assert any(f.startswith("median ED/flair") for f in check_sample(flipped, lab, gate, mods))


def test_ranges_round_trip_and_first_format_files_still_load(tmp_path, phantom_items):
    gate, held, mods = phantom_items
    save_ranges(tmp_path / "r.json", gate)
    assert load_ranges(tmp_path / "r.json") == json.loads(json.dumps(gate))
    old = {"n_cases": 3, "modalities": list(mods), "labels": {"2": {"flair": [0.2, 0.4]}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    v1 = load_ranges(tmp_path / "old.json")
    img, lab = _arrays(held[0])
    img = img.copy()
    img[mods.index("flair"), lab == 2] = 0.9
    assert check_sample(img, lab, v1, mods) == ["median ED/flair: 0.900 outside [0.150, 0.450]"]

"""Training previews (synth.preview, `medddpm train --preview-every N`) and the progress bar's step budget: a preview
PNG at the requested steps only, the same generator bytes with and without previews, the run's state untouched by a
preview, the budget named on the bar and the projected time printed once (tiny profile)."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from core.errors import ConfigError, InputError
from core.fsutil import sha256_file
from synth.checkpoint import STATE_FILE
from synth.preview import LATEST, PREVIEW_DIR, PreviewConfig, Previews, preview_cases
from synth.train import train_medddpm

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the machine is shared

RUN = {"num_threads": 1, "steps": 5, "checkpoint_every": 5, "progress": True}  # progress: in the metadata


@pytest.fixture(scope="module")
def without_previews(toy_cohort, tmp_path_factory):
    return train_medddpm(toy_cohort, "tiny", tmp_path_factory.mktemp("plain"), RUN)


def test_previews_at_the_requested_steps_leave_the_generator_bytes_and_name_the_budget(toy_cohort, tmp_path,
                                                                                      without_previews, capsys):
    """Every 2 steps of 5 and at the last: step_000002/4/5.png, latest.png the newest; the generator and resumable
    state are byte for byte those of the same run without previews (the preview at step 2 and 4 is followed by
    training steps whose draws would move had it drawn from the run's generator); the bar says the 5 steps are of
    the profile's 300, and the first steps' time is projected onto them."""
    published = []
    gen = train_medddpm(toy_cohort, "tiny", tmp_path / "run", RUN,
                        preview=PreviewConfig(every=2, n_masks=2, sampling_steps=2),
                        on_preview=lambda png, step, steps: published.append((png.name, step, steps)))
    folder = tmp_path / "run" / PREVIEW_DIR
    assert sorted(p.name for p in folder.iterdir()) == [LATEST, "step_000002.png", "step_000004.png",
                                                        "step_000005.png"]  # no temporary files left either
    assert (folder / LATEST).read_bytes() == (folder / "step_000005.png").read_bytes()
    assert (folder / "step_000002.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert published == [("step_000002.png", 2, 5), ("step_000004.png", 4, 5), ("step_000005.png", 5, 5)]
    assert sha256_file(gen) == sha256_file(without_previews)
    assert torch.load(gen.parent / STATE_FILE, weights_only=True)["rng"].equal(
        torch.load(without_previews.parent / STATE_FILE, weights_only=True)["rng"])
    out = capsys.readouterr()
    assert "Med-DDPM train (5 of the profile's 300 steps)" in out.err  # tqdm's bar, on stderr
    assert out.out.count("s per step here") == 1 and "the profile's 300 steps about" in out.out


def test_a_preview_changes_no_state_of_the_run_and_repeats_its_samples(toy_cohort, tmp_path):
    """A preview leaves the run's generator, the network's train mode and autocast as they were, and the same EMA
    gives the same samples at every preview (fixed seeds, own generators)."""
    from synth.config import get_config
    from synth.data import training_rows
    from synth.distributed import Ranks
    from synth.train import _setup

    cfg = get_config("tiny").replace(num_threads=1, progress=False)
    run = _setup(cfg, tmp_path, torch.device("cpu"), Ranks(), 6, "cases", None)
    run.model.train()
    run.step, run.log_rows = 2, [{"step": 1, "loss": "0.8"}, {"step": 2, "loss": "0.7"}]
    previews = Previews(PreviewConfig(every=2, n_masks=2, sampling_steps=2), toy_cohort, cfg,
                        training_rows(toy_cohort, cfg), tmp_path)
    rng_before, global_before = run.rng.get_state(), torch.get_rng_state()
    assert previews.after_step(run) == tmp_path / PREVIEW_DIR / "step_000002.png"
    assert run.rng.get_state().equal(rng_before) and torch.get_rng_state().equal(global_before)
    assert run.model.training and not run.ema.training and not torch.is_autocast_enabled()
    first, again = previews.samples(run.ema), previews.samples(run.ema)
    assert all(torch.equal(a, b) for a, b in zip(first, again)) and not torch.equal(first[0], first[1])
    run.step = 3
    assert previews.after_step(run) is None  # not due: nothing written
    assert not (tmp_path / PREVIEW_DIR / "step_000003.png").exists()


def test_preview_masks_are_chosen_evenly_or_by_name_and_bad_settings_are_refused(toy_cohort):
    rows = pd.DataFrame({"case_id": [f"c{i}" for i in range(7)]})
    assert preview_cases(toy_cohort, rows, PreviewConfig(every=1)) == ["c0", "c3", "c6"]
    assert preview_cases(toy_cohort, rows.head(2), PreviewConfig(every=1, n_masks=4)) == ["c0", "c1"]
    assert preview_cases(toy_cohort, rows, PreviewConfig(every=1, case_ids=("c5", "c1"))) == ["c5", "c1"]
    with pytest.raises(InputError, match=r"--preview-masks nope: not among the 7 training rows") as e:
        preview_cases(toy_cohort, rows, PreviewConfig(every=1, case_ids=("c1", "nope")))
    assert str(toy_cohort) in str(e.value)
    with pytest.raises(ConfigError, match="--preview-every must be >= 1"):
        PreviewConfig(every=0)
    assert PreviewConfig(every=3).due(3, 10) and PreviewConfig(every=3).due(10, 10)
    assert not PreviewConfig(every=3).due(4, 10)


def test_the_bar_names_the_paper_profiles_budget_and_the_projection_scales_the_step_time():
    from synth.config import get_config
    from synth.train import projection, train_description

    budget = get_config("paper-brats").steps
    assert train_description(5000, budget) == "Med-DDPM train (5000 of the profile's 100k steps)"
    assert train_description(budget, budget) == train_description(300, None) == "Med-DDPM train"
    assert "this run's 5000 steps take about 83.3 min, the profile's 100k steps about 27.8 h" in projection(1.0, 5000,
                                                                                                        budget)


def test_cli_train_passes_the_preview_settings(monkeypatch, tmp_path):
    import synth.train
    from medddpm.cli import main

    seen = []
    monkeypatch.setattr(synth.train, "train_medddpm", lambda *a, **k: seen.append(k) or "generator.safetensors")
    common = ["train", "--manifest", "m.csv", "--out", str(tmp_path / "o"), "--profile", "tiny"]
    assert main([*common, "--preview-every", "50", "--preview-masks", "a,b", "--preview-steps", "4"]) == 0
    assert main(common) == 0
    assert seen[0]["preview"] == PreviewConfig(every=50, case_ids=("a", "b"), sampling_steps=4)
    assert seen[1] == {}  # no previews: train_medddpm called as before


def test_the_flow_publishes_each_preview_as_an_artifact_naming_its_file(monkeypatch, tmp_path):
    import prefect.artifacts

    from flows.tasks import PREVIEW_ARTIFACT, publish_preview

    made = []
    monkeypatch.setattr(prefect.artifacts, "create_markdown_artifact", lambda **k: made.append(k))
    png = tmp_path / "previews" / "step_000500.png"
    publish_preview(png, 500, 700)
    assert made[0]["key"] == PREVIEW_ARTIFACT and str(png) in made[0]["markdown"]
    assert "step 500 of 700" in made[0]["description"]

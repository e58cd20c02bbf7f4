"""The authors' Med-DDPM network and the import of their published checkpoints (synth.authors_unet,
synth.authors_weights), checked against files made in their exact format (../shared/fixtures/official-medddpm;
its key listings are copied to tests/fixtures/).

Tests that need the checkpoint files skip with the reason when the folder is absent (a fresh clone has no
../shared), and fail instead under CI (MEDDDPM_REQUIRE_ALL=1: tests/conftest.py skip_or_fail)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from core.errors import InputError
from cohort.labels import BRAIN, MODALITIES
from cohort.profiles import PROFILES as GRIDS, Profile
from synth.config import get_config
from tests.conftest import skip_or_fail

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / ".." / "shared" / "fixtures" / "official-medddpm"
KEY_LISTINGS = REPO / "tests" / "fixtures"  # copies of FIXTURES' *_keys.txt
CKPT = FIXTURES / "brats_c32_r1.pt"
needs_fixtures = pytest.mark.skip_or_fail_if(
    not CKPT.exists(), reason=f"the authors'-format fixtures are not at {FIXTURES} (CI has ../shared beside the "
                              "checkout; a fresh clone does not)")
# the fixture network has 5 levels (downsampling 16): a 16^3 test grid
GRID = Profile("tiny16", (16, 16, 16), (9.0, 9.0, 9.0), MODALITIES, "tests of 5-level networks")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: the machine is shared, 2 threads thrash


@pytest.fixture
def tiny16(monkeypatch):
    monkeypatch.setitem(GRIDS, GRID.name, GRID)
    return GRID.name


def _reverse_axes(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, W, H) <-> (B, C, X, Y, Z): the authors' axis order is ours with the spatial axes reversed."""
    return x.permute(0, 1, 4, 3, 2)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def authors_ckpt():
    if not CKPT.exists():
        skip_or_fail(f"no fixtures at {FIXTURES}")
    return torch.load(CKPT, map_location="cpu", weights_only=True)


# --- the network computes their function --------------------------------------------------------------------

@needs_fixtures
def test_imported_fixture_reproduces_the_authors_output_in_our_axis_order():
    from synth.authors_weights import load_authors_model

    model, cfg, step = load_authors_model(CKPT, "authors-brats")
    assert cfg.architecture == "authors" and cfg.channels == (32, 32, 64, 96, 128) and cfg.num_res_blocks == 1
    assert step == 1234
    io = torch.load(FIXTURES / "brats_c32_r1_io.pt", map_location="cpu", weights_only=True)
    ours = torch.cat([_reverse_axes(io["x_t"]), _reverse_axes(io["cond"])], dim=1)  # nibabel order (X, Y, Z)
    with torch.no_grad():
        eps = model(ours, io["t"])
        assert _rel_err(_reverse_axes(eps), io["eps"]) <= 1e-4
        # the conversion is not a no-op: their-order input into the converted network gives another function
        naive = model(torch.cat([io["x_t"], io["cond"]], dim=1), io["t"])
    assert _rel_err(naive, io["eps"]) > 1e-2


@pytest.mark.parametrize("profile,listing", [("authors-brats", "brats_c64_r2_keys.txt"),
                                             ("authors-wholehead", "wholehead_c64_r1_keys.txt")])
def test_published_configurations_have_exactly_the_listed_keys_and_shapes(profile, listing):
    from synth.network import build_unet

    theirs = {}
    for line in (KEY_LISTINGS / listing).read_text().splitlines():
        key, shape, _ = line.split("\t")
        if key.startswith("denoise_fn."):
            theirs[key[len("denoise_fn."):]] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    with torch.device("meta"):  # shapes only: no memory, no init time
        net = build_unet(get_config(profile))
    ours = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert sorted(ours) == sorted(theirs)
    assert ours == theirs


def test_wholehead_condition_values_are_mapped_to_plus_minus_one_inside_the_network():
    """condition_values='pm1': callers pass {0, 1}; the network sees the authors' {-1, +1}."""
    from synth.network import build_unet

    small = dict(channels=(32, 32), attention_levels=(False, True), num_res_blocks=1, norm_num_groups=32)
    cfg = get_config("authors-wholehead").replace(**small)
    torch.manual_seed(0)
    pm1 = build_unet(cfg)
    plain = build_unet(cfg.replace(condition_values="01"))
    plain.load_state_dict(pm1.state_dict())
    for p in pm1.parameters():  # guided-diffusion zero-initialises output convs; make the output depend on input
        torch.nn.init.normal_(p, std=0.05)
    plain.load_state_dict(pm1.state_dict())
    x = torch.randn(1, 1, 8, 8, 8)
    cond = (torch.rand(1, 2, 8, 8, 8) > 0.5).float()
    t = torch.tensor([7])
    with torch.no_grad():
        a = pm1(torch.cat([x, cond], 1), t)
        b = plain(torch.cat([x, 2 * cond - 1], 1), t)
        c = plain(torch.cat([x, cond], 1), t)
    torch.testing.assert_close(a, b)
    assert _rel_err(c, b) > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients():
    from synth.authors_unet import AuthorsUNet

    torch.manual_seed(1)
    kw = dict(in_channels=3, out_channels=1, channels=(32, 32), attention_levels=(False, True), num_res_blocks=1)
    plain, ckpt = AuthorsUNet(**kw), AuthorsUNet(**kw, gradient_checkpointing=True)
    for p in plain.parameters():
        torch.nn.init.normal_(p, std=0.05)
    ckpt.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 8, 8, 8), torch.tensor([3, 100])
    grads = []
    for net in (plain, ckpt):
        net.train()
        net(x, t).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


# --- bad files: one clear error naming the file -------------------------------------------------------------

def _save(path: Path, ema: dict) -> Path:
    torch.save({"step": 1, "model": ema, "ema": ema}, path)
    return path


@needs_fixtures
def test_truncated_and_corrupted_files_are_refused_naming_the_file(tmp_path):
    from synth.authors_weights import import_authors_weights

    data = CKPT.read_bytes()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(data[: len(data) // 2])
    corrupted = tmp_path / "corrupted.pt"
    corrupted.write_bytes(b"\x00garbage" * 64 + data[512:])
    for bad in (truncated, corrupted):
        with pytest.raises(InputError, match="not a readable torch checkpoint") as e:
            import_authors_weights(bad, "authors-brats", tmp_path / "out")
        assert str(bad) in str(e.value)
    assert not (tmp_path / "out" / "generator.safetensors").exists()


@needs_fixtures
def test_a_checkpoint_of_the_other_model_is_refused(tmp_path, authors_ckpt):
    from synth.authors_weights import import_authors_weights

    with pytest.raises(InputError, match="--format authors-brats") as e:  # BraTS file given as whole-head
        import_authors_weights(CKPT, "authors-wholehead", tmp_path / "out")
    assert str(CKPT) in str(e.value) and "8 -> 4" in str(e.value)
    # a checkpoint of our own training (MONAI network, no 'denoise_fn.' prefix)
    from synth.network import build_unet

    ours = tmp_path / "ours.pt"
    torch.save({"step": 3, "model": build_unet(get_config("tiny")).state_dict(),
                "ema": build_unet(get_config("tiny")).state_dict()}, ours)
    with pytest.raises(InputError, match="denoise_fn") as e:
        import_authors_weights(ours, "authors-brats", tmp_path / "out")
    assert str(ours) in str(e.value)


@needs_fixtures
@pytest.mark.parametrize("change", ["missing", "extra", "shape"])
def test_a_state_dict_with_a_missing_extra_or_misshapen_key_is_refused(tmp_path, authors_ckpt, change):
    from synth.authors_weights import import_authors_weights

    ema = dict(authors_ckpt["ema"])
    key = "denoise_fn.output_blocks.2.0.in_layers.0.weight"
    if change == "missing":
        del ema[key]
    elif change == "extra":
        ema["denoise_fn.output_blocks.2.0.bonus.weight"] = torch.zeros(3)
    else:
        ema[key] = torch.zeros(7)
    bad = _save(tmp_path / f"{change}.pt", ema)
    with pytest.raises(InputError) as e:
        import_authors_weights(bad, "authors-brats", tmp_path / "out")
    msg = str(e.value)
    assert str(bad) in msg
    assert ("bonus" if change == "extra" else key[len("denoise_fn."):]) in msg


@needs_fixtures
def test_a_different_noise_schedule_is_refused(tmp_path, authors_ckpt):
    from synth.authors_weights import import_authors_weights

    ema = dict(authors_ckpt["ema"])
    betas = torch.linspace(1e-4, 0.02, 250)  # the linear DDPM schedule
    ema["betas"], ema["alphas_cumprod"] = betas, torch.cumprod(1 - betas, 0)
    bad = _save(tmp_path / "linear.pt", ema)
    with pytest.raises(InputError, match="noise schedule differs") as e:
        import_authors_weights(bad, "authors-brats", tmp_path / "out")
    assert str(bad) in str(e.value)
    ema["alphas_cumprod"] = authors_ckpt["ema"]["alphas_cumprod"][:100]
    with pytest.raises(InputError, match="T = 100"):
        import_authors_weights(_save(tmp_path / "short.pt", ema), "authors-brats", tmp_path / "out")


# --- import -> synthesize, import -> fine-tune --------------------------------------------------------------

def _toy_cohort(root: Path, n_train: int, n_val: int, shape=(16, 16, 16)) -> Path:
    from cohort.manifest import append_rows, make_row
    from cohort.nifti import write_array
    from tests.conftest import make_toy_case

    manifest = root / "data_manifest.csv"
    rng = np.random.default_rng(3)
    affine = np.diag([9.0, 9.0, 9.0, 1.0])
    rows = []
    for i in range(n_train + n_val):
        cid, split = f"c{i:02d}", "train" if i < n_train else "val"
        images, label = make_toy_case(rng, shape)
        paths = {m: write_array(root / cid / f"{cid}_{m}.nii.gz", a, affine) for m, a in images.items()}
        lpath = write_array(root / cid / f"{cid}_seg.nii.gz", label, affine)
        rows.append(make_row(manifest, case_id=cid, cohort="toy16", source="real", split=split, images=paths,
                             label=lpath, shape=label.shape, spacing=(9.0, 9.0, 9.0)))
    append_rows(manifest, rows)
    return manifest


@needs_fixtures
def test_import_weights_then_synthesize_end_to_end(tmp_path, tiny16):
    from cohort.manifest import load_manifest, validate_manifest
    from medddpm.cli import main
    from synth.checkpoint import load_generator
    from synth.schedulers import SAMPLERS, make_sampler, sample

    cohort = _toy_cohort(tmp_path / "cohort", 2, 0)
    gen_dir = tmp_path / "imported"
    assert main(["import-weights", str(CKPT), "--format", "authors-brats", "--out", str(gen_dir),
                 "--profile", tiny16]) == 0
    model, cfg, meta = load_generator(gen_dir)
    assert cfg.architecture == "authors" and cfg.profile == tiny16
    from core.fsutil import sha256_file

    assert meta["source_sha256"] == sha256_file(CKPT) and meta["source_weights"] == "ema"
    # every sampler runs on the imported network
    cond = torch.zeros(1, 4, 16, 16, 16)
    cond[:, 3, 4:12, 4:12, 4:12] = 1
    for name in SAMPLERS:
        x = sample(model, make_sampler(name, cfg.timesteps, cfg.schedule), cond, 4, 2, [0])
        assert x.shape == (1, 4, 16, 16, 16) and torch.isfinite(x).all()

    out = tmp_path / "synthetic"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["synthesize", "--checkpoint", str(gen_dir), "--masks", str(cohort), "--count", "2",
                     "--steps", "3", "--out", str(out), "--threads", "1", "--no-progress"]) == 0
    assert any("not quality-gated" in str(w.message) for w in caught)
    df = load_manifest(out / "data_manifest.csv")
    assert len(df) == 2 and set(df["quality_gate"]) == {"unchecked"}
    assert set(df["generator_checkpoint"]) == {sha256_file(gen_dir / "generator.safetensors")}
    validate_manifest(out / "data_manifest.csv", check_files=True)

    # with --ranges-from the gate is on again
    gated_dir = tmp_path / "imported-gated"
    assert main(["import-weights", str(CKPT), "--format", "authors-brats", "--out", str(gated_dir),
                 "--profile", tiny16, "--ranges-from", str(cohort)]) == 0
    assert (gated_dir / "intensity_ranges.json").exists()
    assert main(["synthesize", "--checkpoint", str(gated_dir), "--masks", str(cohort), "--count", "1",
                 "--steps", "3", "--max-retries", "0", "--out", str(tmp_path / "gated"), "--threads", "1",
                 "--no-progress"]) == 0
    assert set(load_manifest(tmp_path / "gated" / "data_manifest.csv")["quality_gate"]) <= {"pass", "fail"}


@needs_fixtures
def test_fine_tuning_from_the_imported_fixture_lowers_the_held_out_denoising_loss(tmp_path, tiny16):
    from synth.authors_weights import import_authors_weights
    from synth.checkpoint import load_generator
    from synth.data import load_items, training_rows
    from synth.train import denoising_loss, train_medddpm

    cohort = _toy_cohort(tmp_path / "cohort", 4, 2)
    gen = import_authors_weights(CKPT, "authors-brats", tmp_path / "imported", profile=tiny16)
    imported, icfg, _ = load_generator(gen)
    val = load_items(cohort, icfg, training_rows(cohort, icfg, splits=("val",)))
    before = denoising_loss(imported, val, icfg, n_draws=4)

    # the tiny recipe (short EMA, high lr) on the tiny16 grid; the network comes from the init generator
    cfg = get_config("tiny").replace(profile=tiny16, init_from=str(gen), steps=8, lr=3e-3, batch_size=2,
                                     grad_accum=1, ema_every=1, ema_start=10 ** 6, checkpoint_every=8,
                                     num_threads=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = train_medddpm(cohort, "tiny", tmp_path / "ft", cfg)
    tuned, tcfg, _ = load_generator(out)
    assert tcfg.architecture == "authors" and tcfg.channels == icfg.channels and tcfg.init_from == str(gen)
    record = pd.read_json(out.parent / "config.json", typ="series")
    from core.fsutil import sha256_file

    assert record["init_from_sha256"] == sha256_file(gen)
    after = denoising_loss(tuned, val, tcfg, n_draws=4)
    # same (t, noise) draws for both; the random-weight fixture starts near the loss of predicting 0 (E|ε| ≈ 0.80)
    assert after < 0.95 * before, (before, after)


def test_cli_train_init_from_starts_from_the_generator_weights(toy_cohort, tmp_path):
    """--init-from loads the generator (here a MONAI one); with lr 0 the result equals it, and config.json
    records the file's sha256."""
    from core.fsutil import sha256_file
    from medddpm.cli import main
    from safetensors.torch import load_file

    common = ["train", "--manifest", str(toy_cohort), "--profile", "tiny", "--steps", "2", "--threads", "1",
              "--no-progress"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    gen_a = tmp_path / "a" / "generator.safetensors"
    assert main(common + ["--out", str(tmp_path / "b"), "--lr", "0", "--init-from", str(tmp_path / "a")]) == 0
    a, b = load_file(gen_a), load_file(tmp_path / "b" / "generator.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = pd.read_json(tmp_path / "b" / "config.json", typ="series")
    assert record["init_from"] == str(tmp_path / "a") and record["init_from_sha256"] == sha256_file(gen_a)


def test_fine_tuning_resumes_after_the_init_generator_moved(toy_cohort, tmp_path, capsys):
    """The config hash counts init_from by the generator's content (init_from_sha256, set where training starts):
    a run resumes when its checkout (and with it the init file's path) moved, and is refused when the init weights
    are other ones."""
    import shutil

    from core.fsutil import sha256_file
    from medddpm.cli import main
    from synth.checkpoint import load_generator, with_init_sha256
    from synth.config import get_config

    common = ["train", "--manifest", str(toy_cohort), "--profile", "tiny", "--threads", "1", "--no-progress"]
    assert main(common + ["--steps", "2", "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--steps", "3", "--seed", "1", "--out", str(tmp_path / "other")]) == 0
    gen = tmp_path / "a" / "generator.safetensors"
    cfg = get_config("tiny")
    by_content = lambda init: with_init_sha256(cfg.replace(init_from=str(init))).hash()  # noqa: E731
    assert by_content(gen) == by_content(tmp_path / "a")
    assert by_content(gen) != by_content(tmp_path / "other")
    assert cfg.replace(init_from=str(gen)).hash() != by_content(gen)  # without its sha256: by path
    assert main(common + ["--steps", "2", "--out", str(tmp_path / "ft"), "--init-from", str(gen)]) == 0
    moved = tmp_path / "moved" / "generator.safetensors"
    moved.parent.mkdir()
    shutil.move(gen, moved)
    assert by_content(moved) != cfg.replace(init_from=str(gen)).hash()  # gone: by path
    with pytest.raises(InputError, match="does not exist"):
        with_init_sha256(cfg.replace(init_from=str(gen)))
    assert main(common + ["--steps", "4", "--out", str(tmp_path / "ft"), "--init-from", str(moved)]) == 0
    record = pd.read_json(tmp_path / "ft" / "config.json", typ="series")
    assert record["init_from"] == str(moved) and record["init_from_sha256"] == sha256_file(moved)
    assert load_generator(tmp_path / "ft")[2]["step"] == "4"  # resumed to the new --steps
    capsys.readouterr()
    assert main(common + ["--steps", "6", "--out", str(tmp_path / "ft"), "--init-from", str(tmp_path / "other")]) != 0
    assert "checkpoint was trained with a different config" in capsys.readouterr().err


def test_init_from_a_generator_of_another_network_is_refused_naming_it(tmp_path):
    """A generator whose weights do not fit the training network gives one clear error."""
    from synth.checkpoint import init_weights, save_generator
    from synth.network import build_unet

    tiny = get_config("tiny")
    gen = save_generator(tmp_path / "generator.safetensors", build_unet(tiny), tiny, 0)
    other = tiny.replace(channels=(8, 16, 24), init_from=str(gen))
    with pytest.raises(InputError, match="do not fit") as e:
        init_weights(build_unet(other), other)
    assert str(gen) in str(e.value)


# --- the authors' preprocessing ------------------------------------------------------------------------------

def test_authors_preprocessing_keeps_voxel_order_centre_crops_and_rescales_min_max():
    from cohort.preprocess import preprocess_case
    from cohort.volume import Volume
    from tests.conftest import make_toy_case

    small = Profile("authors-small", (20, 16, 18), (6.0, 6.0, 6.0), MODALITIES, "test",
                    scaling="minmax", crop="centre", reorient=False, brain_label="above-min")
    assert {k: getattr(GRIDS["authors-brats"], k) for k in ("scaling", "crop", "reorient", "brain_label")} == \
        {k: getattr(small, k) for k in ("scaling", "crop", "reorient", "brain_label")}
    rng = np.random.default_rng(5)
    shape = (25, 13, 18)  # x cropped by 5 (3 at the start, as TorchIO), y padded by 3 (2 at the start), z kept
    images, label = make_toy_case(rng, shape)
    affine = np.diag([-6.0, -6.0, 6.0, 1.0])  # LPS, as BraTS files are stored
    affine[:3, 3] = [70.0, 80.0, -55.0]
    data = {m: ((a + 1.0) * 400.0 * (label > 0) + 3.0).astype(np.float32) for m, a in images.items()}
    vol = Volume.from_channels(data, affine)
    out, lab = preprocess_case(vol, np.where(label == BRAIN, 0, label), small)
    assert out.shape == small.shape and lab.shape == small.shape
    np.testing.assert_allclose(out.affine[:3, :3], affine[:3, :3], atol=1e-6)  # source voxel order kept
    for ci, m in enumerate(small.modalities):
        ref = np.pad(data[m][3:23], ((0, 0), (2, 1), (0, 0)))  # centre crop/pad with zeros, then min-max
        ref = (ref - ref.min()) / (ref.max() - ref.min()) * 2 - 1
        np.testing.assert_allclose(out.data[ci], ref, atol=1e-5)
    # brain = T1 above its minimum, tumour labels kept
    src_t1 = np.pad(data["t1"][3:23], ((0, 0), (2, 1), (0, 0)))
    src_lab = np.pad(label[3:23], ((0, 0), (2, 1), (0, 0)))
    np.testing.assert_array_equal(lab == BRAIN, (src_t1 > src_t1.min()) & ~np.isin(src_lab, (1, 2, 3)))
    np.testing.assert_array_equal(np.isin(lab, (1, 2, 3)), np.isin(src_lab, (1, 2, 3)))
    # the output affine still places every voxel where it was: output voxel (0, 2, 0) is source voxel (3, 0, 0)
    np.testing.assert_allclose(out.affine @ [0, 2, 0, 1], affine @ [3, 0, 0, 1], atol=1e-5)

"""Mask editing: scale, shift and transplant rules, and the edited-mask manifest."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cohort.labels import BRAIN, ED, ET, NCR, brain_mask, tumour_mask
from cohort.maskedit import EditRejected, scale_tumour, shift_tumour, transplant_tumour


def make_label(shape=(40, 48, 40), centre=(20, 24, 20), radius=5.0, brain_radii=None):
    """Ellipsoid brain (4) with a spherical tumour: NCR core, ET rim, ED halo."""
    idx = np.indices(shape).astype(float)
    c = (np.asarray(shape) - 1) / 2
    radii = np.asarray(brain_radii if brain_radii is not None else np.asarray(shape) * 0.45)
    brain = (((idx - c[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
    r = np.sqrt(((idx - np.asarray(centre, float)[:, None, None, None]) ** 2).sum(0))
    lab = np.where(brain, BRAIN, 0).astype(np.uint8)
    lab[brain & (r <= radius)] = ED
    lab[brain & (r <= 0.7 * radius)] = ET
    lab[brain & (r <= 0.35 * radius)] = NCR
    return lab


def n_tumour(lab):
    return int(tumour_mask(lab).sum())


@pytest.mark.parametrize("factor", [0.6, 1.5, 2.0])
def test_scale_changes_volume_by_factor_cubed(factor):
    lab = make_label(radius=5.0)
    new = scale_tumour(lab, factor, min_voxels=10)
    ratio = n_tumour(new) / n_tumour(lab)
    assert ratio == pytest.approx(factor ** 3, rel=0.2)
    # brain untouched, label values stay in the convention, each class scaled too (NCR inside ET inside ED)
    assert np.array_equal(brain_mask(new), brain_mask(lab))
    assert set(np.unique(new).tolist()) == {0, NCR, ED, ET, BRAIN}
    c_old = np.argwhere(tumour_mask(lab)).mean(0)
    c_new = np.argwhere(tumour_mask(new)).mean(0)
    assert np.allclose(c_old, c_new, atol=0.6)  # about the centroid


def test_scale_keeps_only_tumour_inside_brain():
    lab = make_label(centre=(20, 24, 34), radius=4.0)  # near the top of the brain
    new = scale_tumour(lab, 2.0, min_voxels=10)
    assert not (tumour_mask(new) & ~brain_mask(lab)).any()
    assert n_tumour(new) < 8 * n_tumour(lab)


def test_scale_below_min_voxels_rejected():
    lab = make_label(radius=3.0)  # ~113 voxels; x0.5 -> ~14
    with pytest.raises(EditRejected, match="need 30"):
        scale_tumour(lab, 0.5)
    assert n_tumour(scale_tumour(lab, 0.5, min_voxels=5)) > 5  # min_voxels is a parameter


def test_shift_inside_brain_moves_tumour():
    lab = make_label(radius=4.0)
    new = shift_tumour(lab, (3, -2, 1))
    assert n_tumour(new) == n_tumour(lab)
    shift = np.argwhere(tumour_mask(new)).mean(0) - np.argwhere(tumour_mask(lab)).mean(0)
    assert np.allclose(shift, (3, -2, 1))
    assert np.array_equal(brain_mask(new), brain_mask(lab))
    # the old tumour place is brain now
    old_only = tumour_mask(lab) & ~tumour_mask(new)
    assert old_only.any() and np.all(new[old_only] == BRAIN)


def test_shift_leaving_brain_rejected():
    lab = make_label(radius=4.0)
    with pytest.raises(EditRejected, match="inside the brain"):
        shift_tumour(lab, (0, 0, 20))  # tumour centre 2.5 voxels above the brain's top: most of it outside
    with pytest.raises(EditRejected):
        shift_tumour(lab, (0, 60, 0))  # off the grid entirely
    # half-way out: 50 % rule decides; a smaller step that keeps > 50 % inside is accepted
    brain_top = np.argwhere(brain_mask(lab))[:, 2].max()
    ok = shift_tumour(lab, (0, 0, brain_top - 20 - 4))
    assert not (tumour_mask(ok) & ~brain_mask(lab)).any()


def test_shift_below_min_voxels_rejected():
    lab = make_label(radius=1.8)  # a small tumour well inside the brain
    assert 0 < n_tumour(lab) < 30
    with pytest.raises(EditRejected, match="need 30"):
        shift_tumour(lab, (1, 0, 0))
    assert n_tumour(shift_tumour(lab, (1, 0, 0), min_voxels=10)) == n_tumour(lab)


def test_transplant_lands_inside_recipient_brain():
    donor = make_label(centre=(14, 30, 22), radius=5.0)
    recipient = make_label(centre=(26, 20, 18), radius=3.0, brain_radii=(16, 19, 15))
    new = transplant_tumour(donor, recipient, min_voxels=10)
    assert np.array_equal(brain_mask(new), brain_mask(recipient))
    assert not (tumour_mask(new) & ~brain_mask(recipient)).any()
    # the tumour is the donor's (where the donor had it), the recipient's own tumour is gone
    assert (tumour_mask(new) & tumour_mask(donor)).sum() == n_tumour(new)
    assert not (tumour_mask(new) & tumour_mask(recipient) & ~tumour_mask(donor)).any()
    small = make_label(radius=3.0, brain_radii=(6, 6, 6))  # donor tumour mostly outside this small brain
    with pytest.raises(EditRejected, match="recipient brain"):
        transplant_tumour(donor, small)


def test_edit_masks_writes_parented_manifest(toy_cohort, tmp_path):
    from core.fsutil import sha256_file
    from cohort.manifest import load_manifest, resolve, validate_manifest
    from cohort.maskedit import edit_masks
    from cohort.nifti import read_label

    out = edit_masks(toy_cohort, tmp_path / "masks", n_per_case=3, seed=5, split="train", min_voxels=10,
                     progress=False)
    df = validate_manifest(out)
    parents = load_manifest(toy_cohort).set_index("case_id")
    assert len(df) == 6 * 3 and set(df["source"]) == {"mask"}
    kinds = set()
    for _, row in df.iterrows():
        parent = parents.loc[row["parent_case_id"]]
        assert row["split"] == parent["split"] == "train"
        kind, _, arg = row["mask_edit"].partition(":")
        kinds.add(kind)
        if kind == "transplant":
            donor = arg.removeprefix("from=")
            assert donor in parents.index and donor != row["parent_case_id"]
            assert parents.loc[donor, "split"] == "train"  # donors never come from another split
        lab, aff = read_label(resolve(out, row["label"]))
        plab, paff = read_label(resolve(toy_cohort, parent["label"]))
        assert np.allclose(aff, paff)  # parent's affine
        assert np.array_equal(brain_mask(lab), brain_mask(plab))
        assert n_tumour(lab) >= 10
        assert pd.isna(row["t1"])  # a mask has no image
    assert kinds == {"scale", "shift", "transplant"}
    # deterministic and resumable
    again = edit_masks(toy_cohort, tmp_path / "masks2", n_per_case=3, seed=5, split="train", min_voxels=10,
                       progress=False)
    h = lambda m: sorted(sha256_file(resolve(m, p)) for p in load_manifest(m)["label"])  # noqa: E731
    assert h(out) == h(again)
    before = out.read_text()
    edit_masks(toy_cohort, tmp_path / "masks", n_per_case=3, seed=5, split="train", min_voxels=10, progress=False)
    assert out.read_text() == before


def test_cli_edit_masks(toy_cohort, tmp_path):
    from cohort.manifest import load_manifest
    from medddpm.cli import main

    rc = main(["edit-masks", str(toy_cohort), "--out", str(tmp_path / "m"), "--per-case", "1", "--split", "test",
               "--kinds", "scale", "--scale-range", "1.2,1.5", "--min-voxels", "10"])
    assert rc == 0
    df = load_manifest(tmp_path / "m" / "data_manifest.csv")
    assert len(df) == 2 and set(df["split"]) == {"test"} and df["mask_edit"].str.startswith("scale:").all()

"""Preprocessing to a profile: grid, orientation, intensity range, world position and the derived brain label."""
from __future__ import annotations

import hashlib

import nibabel as nib
import numpy as np
import pytest

from core.errors import InputError
from cohort.labels import BRAIN, TUMOUR_LABELS
from cohort.preprocess import preprocess_case
from cohort.profiles import get_profile
from cohort.volume import Volume
from tests.conftest import make_toy_case

SHAPE, SPACING = (24, 28, 20), (6.0, 6.0, 6.0)


def _lps_case(seed=1):
    """A toy case stored like BraTS (x and y flipped, LPS-like), in scanner units, with its true brain label."""
    rng = np.random.default_rng(seed)
    images, label = make_toy_case(rng, SHAPE)
    affine = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    affine[:3, 3] = [70.0, 80.0, -55.0]
    data = {m: ((a + 1.0) * 400.0 * (label > 0)).astype(np.float32) for m, a in images.items()}
    return Volume.from_channels(data, affine), label


def _world_centroid(label, affine):
    idx = np.argwhere(np.isin(label, TUMOUR_LABELS)).mean(axis=0)
    return affine[:3, :3] @ idx + affine[:3, 3]


@pytest.mark.parametrize("profile", ["tiny", "demo"])
def test_profile_grid_orientation_range_and_world_position(profile):
    vol, true_label = _lps_case()
    no_brain = np.where(true_label == BRAIN, 0, true_label)
    out, lab = preprocess_case(vol, no_brain, profile)
    p = get_profile(profile)
    assert out.shape == p.shape and lab.shape == p.shape
    assert out.channels == p.modalities
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(out.spacing, p.spacing, atol=1e-6)
    assert out.data.dtype == np.float32 and lab.dtype == np.uint8
    assert out.data.min() >= -1.0 and out.data.max() <= 1.0
    for ch in out.data:  # per-channel scaling uses the whole range
        assert ch.max() > 0.9 and ch.min() == -1.0
    assert (out.data[:, lab == 0] == -1.0).all()
    # landmark: the tumour centroid stays at the same scanner position (within one output voxel per axis)
    before = _world_centroid(no_brain, vol.affine)
    after = _world_centroid(lab, out.affine)
    assert np.all(np.abs(after - before) <= np.asarray(p.spacing)), (before, after)
    # every tumour label survives resampling
    assert set(np.unique(lab)) == {0, 1, 2, 3, 4}


def test_brain_label_derived_from_image_matches_true_brain():
    vol, true_label = _lps_case(seed=2)
    derived_img, derived = preprocess_case(vol, np.where(true_label == BRAIN, 0, true_label), "demo")
    truth_img, truth = preprocess_case(vol, true_label, "demo")  # source label already holds the brain
    # both grids share spacing and orientation; the crop box may differ by whole voxels: align them in world space
    np.testing.assert_allclose(derived_img.affine[:3, :3], truth_img.affine[:3, :3])
    shift = np.rint((derived_img.affine[:3, 3] - truth_img.affine[:3, 3]) / np.asarray(derived_img.spacing))
    shift = shift.astype(int)
    size = np.asarray(derived.shape) + np.abs(shift) * 2
    a, b = np.zeros(size, bool), np.zeros(size, bool)
    o = np.abs(shift)
    a[tuple(slice(o[i] + shift[i], o[i] + shift[i] + derived.shape[i]) for i in range(3))] = derived > 0
    b[tuple(slice(o[i], o[i] + truth.shape[i]) for i in range(3))] = truth > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice > 0.95, dice
    assert abs(int(np.isin(derived, TUMOUR_LABELS).sum()) - int(np.isin(truth, TUMOUR_LABELS).sum())) <= 2


def test_no_label_gives_brain_only_and_is_deterministic():
    vol, _ = _lps_case(seed=3)
    out1, lab1 = preprocess_case(vol, None, "tiny")
    out2, lab2 = preprocess_case(vol, None, "tiny")
    assert set(np.unique(lab1)) == {0, BRAIN}

    def h(vol, lab):
        return hashlib.sha256(vol.data.tobytes() + lab.tobytes() + vol.affine.tobytes()).hexdigest()

    assert h(out1, lab1) == h(out2, lab2)


def test_preprocess_refuses_missing_modality_and_shape_mismatch():
    vol, label = _lps_case()
    t1_only = Volume(vol.data[:1], vol.affine, ("t1",))
    with pytest.raises(InputError, match=r"case7: missing modality \['t1ce', 't2', 'flair'\]"):
        preprocess_case(t1_only, label, "tiny", name="case7")
    out, _ = preprocess_case(t1_only, label, "paper-wholehead")  # the whole-head profile needs only t1
    assert out.shape == (128, 128, 128) and out.channels == ("t1",)
    with pytest.raises(InputError, match="case7: label shape"):
        preprocess_case(vol, label[:-1], "tiny", name="case7")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brain_mask_cleanup_matches_monai(seed):
    """fill_holes + cc3d.largest_k give MONAI's FillHoles + KeepLargestConnectedComponent mask, voxel for voxel,
    on blobby masks with enclosed holes, holes open to a face, diagonal-only contacts and several islands."""
    import cc3d
    import torch
    from monai.transforms import FillHoles, KeepLargestConnectedComponent
    from scipy import ndimage

    from cohort.preprocess import fill_holes

    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((30, 26, 22)), 1.5) > 0.5  # blobs with holes and islands
    mask[4:20, 4:20, 4:18] = True
    mask[8:16, 8:16, 8:14] = False  # an enclosed cavity
    mask[0, 0, 0] = mask[1, 1, 1] = True  # a diagonal-only contact
    mask[25:, 21:, 17:] = False
    mask[27:29, 23:25, 19:21] = True  # an island
    filled = fill_holes(mask)
    assert filled[10, 10, 10] and not (filled == mask).all()  # there are holes to fill (the test can fail)
    want_filled = np.asarray(FillHoles(applied_labels=[1])(torch.from_numpy(mask[None].astype(np.uint8)))[0])
    assert (filled == want_filled.astype(bool)).all()
    want = np.asarray(KeepLargestConnectedComponent(applied_labels=[1])(
        torch.from_numpy(want_filled[None].astype(np.uint8)))[0]).astype(bool)
    got = cc3d.largest_k(filled, k=1, connectivity=26) > 0
    assert (got == want).all() and got.sum() < filled.sum()  # islands were dropped

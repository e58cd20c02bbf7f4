"""Bring one case (image Volume + optional label) onto a named profile's grid with MONAI dict transforms.

Steps (all MONAI): Orientation RAS -> Spacing to the profile spacing (bilinear images, nearest labels) ->
crop to the brain's bounding box -> per-volume, per-channel percentile scaling to [-1, 1] -> symmetric
pad/crop to the profile shape. Profiles with scaling="minmax", crop="centre" (authors-brats: the authors'
preprocessing, which their published weights expect) instead do: [Orientation RAS unless reorient=False] ->
Spacing -> centred pad/crop to the profile shape (odd voxel at the start, as TorchIO) -> per-volume, per-channel
min-max to [-1, 1].
Each transform updates the MetaTensor's affine, and the output affine is taken from it, so a written file
lands in the same world (scanner mm) position as its source.

The brain label (4) is derived from the image where the source label has none: voxels that are foreground
in any channel (filled, largest component) and are not tumour become 4. Voxels outside the brain are set to
-1 in every channel (BraTS is skull-stripped; the paper's conditioning treats outside-brain as background).
Profiles with brain_label="above-min" (authors-brats) instead follow the authors: brain = voxels whose rescaled
first channel (T1) is above its minimum, and no voxel is forced to -1.
"""
from __future__ import annotations

import math

import cc3d
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (BorderPadd, Compose, CropForegroundd, Orientationd, ResizeWithPadOrCropd,
                              ScaleIntensityd, ScaleIntensityRangePercentilesd, SpatialCropd, Spacingd)

from core.errors import InputError
from .labels import BRAIN, TUMOUR_LABELS
from .nifti import check_same_geometry
from .profiles import Profile, get_profile
from .volume import Volume, select_channels

LOWER_PERCENTILE, UPPER_PERCENTILE = 0.5, 99.5
# a voxel is brain if, in some channel, it is this fraction of the channel's robust range above its floor
FOREGROUND_FRACTION = 0.05
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # nibabel's axis code convention (affines are RAS+)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Boolean mask with its enclosed background filled: what MONAI's FillHoles does (26-connected background
    reached from the array faces stays background), with cc3d labelling instead of iterated dilation (~7x faster
    on a BraTS volume)."""
    bg = cc3d.connected_components(~mask, connectivity=26)
    faces = np.concatenate([bg[0].ravel(), bg[-1].ravel(), bg[:, 0].ravel(), bg[:, -1].ravel(),
                            bg[:, :, 0].ravel(), bg[:, :, -1].ravel()])
    enclosed = np.ones(int(bg.max()) + 1, bool)
    enclosed[faces] = False
    enclosed[0] = False
    return mask | enclosed[bg]


def brain_foreground(image: np.ndarray, label: np.ndarray | None = None) -> np.ndarray:
    """Boolean brain mask from a (C, X, Y, Z) image: union over channels of above-floor voxels, holes filled,
    largest (26-connected) component kept; tumour voxels of ``label`` are always inside."""
    fg = np.zeros(image.shape[1:], bool)
    for ch in image:
        lo, hi = np.percentile(ch, [LOWER_PERCENTILE, UPPER_PERCENTILE])
        if hi > lo:
            fg |= ch > lo + FOREGROUND_FRACTION * (hi - lo)
    if label is not None:
        fg |= np.isin(label, TUMOUR_LABELS)
    if not fg.any():
        return fg
    return cc3d.largest_k(fill_holes(fg), k=1, connectivity=26) > 0


def centre_crop_pad(shape, target) -> tuple[list[int], list[int], list[int]]:
    """Crop window (start, end) and then per-side padding [before0, after0, ...] taking ``shape`` to ``target``
    about the centre, with the odd voxel removed or added at the start of an axis (TorchIO's CropOrPad, which
    the authors used; MONAI's centre crop puts it at the end)."""
    start, end, border = [], [], []
    for n, t in zip(shape, target):
        crop, pad = max(n - t, 0), max(t - n, 0)
        start.append(math.ceil(crop / 2))
        end.append(n - (crop - math.ceil(crop / 2)))
        border += [math.ceil(pad / 2), pad - math.ceil(pad / 2)]
    return start, end, border


def preprocess_case(volume: Volume, label: np.ndarray | None, profile: str | Profile,
                    name: str | None = None) -> tuple[Volume, np.ndarray]:
    """Return (image Volume on the profile grid, values in [-1, 1]; label uint8 0..4 on the same grid).

    volume: the case's modalities on one grid (any orientation / spacing).
    label: our convention (0..4) on the same grid, or None (then the label is brain/background only).
    name: used in error messages (e.g. the case folder).
    """
    profile = get_profile(profile) if isinstance(profile, str) else profile
    volume = select_channels(volume, profile.modalities, name, f"profile {profile.name!r}")
    if label is not None:
        label = np.asarray(label)
        if label.shape != volume.shape:
            raise InputError(name, f"label shape {label.shape} differs from image shape {volume.shape}",
                              kind="shape-mismatch")
    if not np.isfinite(volume.data).all():
        raise InputError(name, "image contains NaN or Inf voxels", kind="non-finite")

    lab = np.zeros(volume.shape, np.uint8) if label is None else label.astype(np.uint8)
    brain_above_min = profile.brain_label == "above-min" and not (lab == BRAIN).any()  # derived after scaling
    if not (lab == BRAIN).any() and not brain_above_min:  # derive on the source grid, move it with the label
        brain = brain_foreground(volume.data, lab)
        if not brain.any():
            raise InputError(name, "no brain foreground found in the image (all channels constant?)",
                              kind="empty-image")
        lab[brain & (lab == 0)] = BRAIN

    affine = torch.as_tensor(volume.affine, dtype=torch.float64)
    data = {"image": MetaTensor(torch.from_numpy(np.ascontiguousarray(volume.data)), affine=affine.clone()),
            "label": MetaTensor(torch.from_numpy(lab[None].astype(np.float32)), affine=affine.clone())}
    if profile.crop == "centre" and profile.scaling == "minmax":
        # the authors' order: pad/crop the field of view first, then rescale what is in it (padding included)
        data = Compose(([Orientationd(keys=("image", "label"), axcodes="RAS", labels=RAS_LABELS)]
                        if profile.reorient else []) + [
            Spacingd(keys=("image", "label"), pixdim=profile.spacing, mode=("bilinear", "nearest"),
                     padding_mode=("zeros", "zeros"))])(data)
        start, end, border = centre_crop_pad(data["image"].shape[1:], profile.shape)
        to_profile = Compose([
            SpatialCropd(keys=("image", "label"), roi_start=start, roi_end=end),
            BorderPadd(keys=("image", "label"), spatial_border=border, mode="constant"),
            ScaleIntensityd(keys="image", minv=-1.0, maxv=1.0, channel_wise=True),
        ])
    elif profile.crop == "brain-bbox" and profile.scaling == "percentile" and profile.reorient:
        to_profile = Compose([
            Orientationd(keys=("image", "label"), axcodes="RAS", labels=RAS_LABELS),
            Spacingd(keys=("image", "label"), pixdim=profile.spacing, mode=("bilinear", "nearest"),
                     padding_mode=("zeros", "zeros")),
            CropForegroundd(keys=("image", "label"), source_key="label", select_fn=lambda x: x > 0,
                            allow_smaller=True),
            ScaleIntensityRangePercentilesd(keys="image", lower=LOWER_PERCENTILE, upper=UPPER_PERCENTILE,
                                            b_min=-1.0, b_max=1.0, clip=True, channel_wise=True),
            ResizeWithPadOrCropd(keys=("image", "label"), spatial_size=profile.shape),
        ])
    else:
        raise InputError(name, f"profile {profile.name}: unsupported combination scaling={profile.scaling}, "
                                f"crop={profile.crop}, reorient={profile.reorient}", kind="bad-profile")
    data = to_profile(data)

    out_affine = np.asarray(data["image"].affine.detach().cpu(), dtype=np.float64)
    check_same_geometry(name, np.asarray(data["label"].affine, dtype=np.float64), name, out_affine)
    img = np.asarray(data["image"].detach().cpu(), dtype=np.float32)
    lab = np.rint(np.asarray(data["label"].detach().cpu())[0]).astype(np.uint8)
    if brain_above_min:  # the authors' rule: brain = background voxels where the rescaled T1 (first) > its min
        lab[(lab == 0) & (img[0] > img[0].min())] = BRAIN
        if not (lab == BRAIN).any():
            raise InputError(name, "no brain foreground found in the image (first channel constant?)",
                              kind="empty-image")
    if profile.scaling == "percentile":  # the authors' min-max keeps their background as it comes out (-1 on BraTS)
        img[:, lab == 0] = -1.0  # outside the brain (incl. padding) is background
    return Volume(img, out_affine, profile.modalities), lab

"""`medddpm import-masks`: a folder of mask-only NIfTI label maps (user-drawn, or another dataset's) into a manifest
of source=mask rows on a profile's grid, with the brain/head label (4) the generator is conditioned on.

Masks without the brain label get it from
- ``image``: the case's own image (a file of --images named like the mask): above-floor voxels, holes filled,
  largest component (cohort.preprocess.brain_foreground, the rule every import uses), tumour always inside;
- ``template``: the brain of a real atlas (cohort.atlases; sri24 by default, the space BraTS is registered to)
  resampled onto the mask's grid with its brain-box centre at the centre of the mask's field of view. This is a
  placement, not a registration: it suits masks drawn in a standard (atlas-like) space; tumour voxels are always
  inside, and a mask whose tumour lies mostly outside the placed template is refused.
Every mask is then brought to the profile's grid by the same MONAI transforms as an imported case
(cohort.preprocess.preprocess_case, nearest-neighbour for the label), so masks and imported cases share a grid.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from core.errors import ConfigError, InputError
from .case_list import read_case_list, write_record
from .labels import ALLOWED_LABELS, BACKGROUND, BRAIN, ED, ET, NCR, TUMOUR_LABELS
from .layouts import parse_mapping
from .manifest import append_rows, load_manifest, make_row
from .nifti import read_array, read_volume, write_array
from .preprocess import brain_foreground, fill_holes, preprocess_case
from .profiles import Profile, get_profile
from .volume import Volume, spacing_of

BRAIN_SOURCES = ("image", "template")
MANIFEST_NAME = "data_manifest.csv"
_LABEL_NAMES = {"background": BACKGROUND, "ncr": NCR, "necrosis": NCR, "ed": ED, "edema": ED, "oedema": ED,
                "et": ET, "enhancing": ET, "brain": BRAIN, "head": BRAIN}
# below this share of tumour voxels inside the placed template the mask is not in the template's space
MIN_TUMOUR_INSIDE_TEMPLATE = 0.5


def mask_case_id(path: Path) -> str:
    name = path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _label_lut(label_map) -> dict[int, int]:
    """Source value -> ours from "4=ET,1=NCR" (values 0-255; ours by number 0-4 or name incl. brain/head)."""
    out = {}
    for k, v in parse_mapping(label_map, "label map").items():
        ours = int(v) if v.isdigit() else _LABEL_NAMES.get(v.strip().lower())
        if not k.isdigit() or ours not in ALLOWED_LABELS:
            raise ConfigError(f"label map entry {k}={v}: need SOURCE_VALUE=OURS with ours one of 0-4 or "
                              f"{sorted(_LABEL_NAMES)}", kind="bad-mapping")
        out[int(k)] = int(ours)
    return out


def _read_mask(path: Path, lut: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    arr, affine = read_array(path)
    if not np.allclose(arr, np.round(arr)):
        raise InputError(path, "mask has non-integer values; give an integer label map", kind="bad-labels")
    lab = np.round(arr).astype(np.int64)
    if lut:
        mapped = lab.copy()
        for src, ours in lut.items():
            mapped[lab == src] = ours
        lab = mapped
    bad = sorted(set(np.unique(lab).tolist()) - set(ALLOWED_LABELS))
    if bad:
        raise InputError(path, f"label values {bad} are not ours {sorted(ALLOWED_LABELS)} (0 background, 1 NCR, "
                               "2 ED, 3 ET, 4 brain); map them with --label-map, e.g. 4=ET for BraTS 2021",
                         kind="bad-labels")
    return lab.astype(np.uint8), affine


def _image_of(images: Path, case_id: str) -> list[Path]:
    """The image file(s) of a mask: images/<case>.nii[.gz], or images/<case>_*.nii[.gz] (one per modality)."""
    exact = [p for p in (images / f"{case_id}.nii.gz", images / f"{case_id}.nii") if p.is_file()]
    return exact or sorted(p for p in images.glob(f"{case_id}_*.nii*") if p.is_file())


def brain_from_image(label: np.ndarray, affine: np.ndarray, image_files: list[Path]) -> np.ndarray:
    """The label with brain (4) where the image is foreground (brain_foreground) and the label is background."""
    vol = read_volume({f"c{k}": p for k, p in enumerate(image_files)})
    if vol.shape != label.shape or not np.allclose(vol.affine, affine, atol=1e-3):
        raise InputError(image_files[0], f"image grid {vol.shape} differs from its mask's {label.shape} (shape or "
                                         "affine); give the image the mask was drawn on", kind="shape-mismatch")
    brain = brain_foreground(vol.data, label)
    if not brain.any():
        raise InputError(image_files[0], "no foreground found in the image (constant?)", kind="empty-image")
    out = label.copy()
    out[brain & (label == BACKGROUND)] = BRAIN
    return out


def brain_from_template(label: np.ndarray, affine: np.ndarray, where: Path, atlas: str = "sri24",
                        cache: str | None = None) -> np.ndarray:
    """The label with brain (4) from an atlas brain placed on the mask's grid (module docstring)."""
    from .atlases import load_atlas

    at = load_atlas(atlas, cache)
    lo, hi = at.brain_box_mm()
    centre_world = (affine @ np.r_[(np.asarray(label.shape) - 1) / 2, 1])[:3]
    # mask voxel -> world -> atlas world shifted so the brain-box centre sits at the field-of-view centre -> atlas voxel
    shift = np.eye(4)
    shift[:3, 3] = (lo + hi) / 2 - centre_world
    # orientation: both sides are world (RAS) coordinates, so a mask in another voxel order still lands right
    vox = np.linalg.inv(at.affine) @ shift @ affine
    brain = ndimage.affine_transform(at.brain.astype(np.float32), vox[:3, :3], vox[:3, 3], output_shape=label.shape,
                                     order=1, mode="constant", cval=0.0) > 0.5
    tumour = np.isin(label, TUMOUR_LABELS)
    if tumour.any() and (brain & tumour).sum() < MIN_TUMOUR_INSIDE_TEMPLATE * tumour.sum():
        raise InputError(where, f"only {(brain & tumour).sum() / tumour.sum():.0%} of the tumour lies inside the "
                                f"{atlas} template placed at the field-of-view centre: the mask is not in an "
                                "atlas-like space; use --brain-from image with the image it was drawn on",
                         kind="template-mismatch")
    brain = fill_holes(brain | tumour)
    out = label.copy()
    out[brain & (label == BACKGROUND)] = BRAIN
    return out


def to_profile_grid(label: np.ndarray, affine: np.ndarray, prof: Profile, name: str) -> tuple[np.ndarray,
                                                                                                np.ndarray]:
    """The label (with its brain label) on the profile's grid, by preprocess_case's transforms: its image
    stand-in is the brain mask itself in every modality (only the geometry of the result is kept)."""
    stand_in = (label > 0).astype(np.float32)
    vol = Volume(np.repeat(stand_in[None], len(prof.modalities), axis=0), affine, prof.modalities)
    out_vol, out_lab = preprocess_case(vol, label, prof, name)
    return out_lab, out_vol.affine


def import_masks(src: str | Path, out_dir: str | Path, profile: str | Profile = "paper-brats", *,
                 brain_from: str | None = None, images: str | Path | None = None, atlas: str = "sri24",
                 cohort: str = "imported-masks", split: str = "train", label_map=None,
                 cases_from: str | Path | None = None, cache: str | None = None) -> Path:
    """Import every ``*.nii``/``*.nii.gz`` of ``src`` as a source=mask row of out_dir/data_manifest.csv (case id:
    the file name without extension); returns the manifest. A mask without the brain label needs ``brain_from``
    ('image' with ``images``, or 'template'). Masks already in the manifest are skipped (resumable). All bad
    masks are reported together in one InputError after the good ones are written."""
    src, out = Path(src), Path(out_dir)
    prof = get_profile(profile) if isinstance(profile, str) else profile
    if brain_from not in (None, *BRAIN_SOURCES):
        raise ConfigError(f"--brain-from must be one of {BRAIN_SOURCES}, not {brain_from!r}", kind="bad-argument")
    if brain_from == "image" and images is None:
        raise ConfigError("--brain-from image needs --images DIR (the image of mask NAME.nii.gz is DIR/NAME.nii.gz "
                          "or DIR/NAME_*.nii.gz)", kind="bad-argument")
    if not src.is_dir():
        raise InputError(src, "mask folder does not exist", kind="missing-file")
    files = sorted(p for p in src.iterdir() if p.is_file() and p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise InputError(src, "holds no .nii or .nii.gz mask", kind="empty-cohort")
    if cases_from is not None:
        subset = read_case_list(cases_from)
        subset.check_known([mask_case_id(p) for p in files], str(src))
        files = [p for p in files if mask_case_id(p) in set(subset.case_ids)]
    lut = _label_lut(label_map)
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / MANIFEST_NAME
    if cases_from is not None:
        write_record(out, subset)
    done = set(load_manifest(manifest)["case_id"]) if manifest.exists() else set()
    problems: list[str] = []
    for path in files:
        cid = mask_case_id(path)
        if cid in done:
            continue
        try:
            label, affine = _read_mask(path, lut)
            if not (label == BRAIN).any():
                if brain_from is None:
                    raise InputError(path, "has no brain label (4); give --brain-from image (with --images) or "
                                           "--brain-from template", kind="no-brain")
                if brain_from == "image":
                    found = _image_of(Path(images), cid)
                    if not found:
                        raise InputError(path, f"no image {cid}.nii.gz or {cid}_*.nii.gz in {images}",
                                         kind="missing-file")
                    label = brain_from_image(label, affine, found)
                else:
                    label = brain_from_template(label, affine, path, atlas, cache)
            grid_label, grid_affine = to_profile_grid(label, affine, prof, str(path))
            lab_path = write_array(out / cid / f"{cid}_seg.nii.gz", grid_label, grid_affine)
            append_rows(manifest, [make_row(manifest, case_id=cid, cohort=cohort, source="mask", split=split,
                                            images={}, label=lab_path, shape=grid_label.shape,
                                            spacing=spacing_of(grid_affine),
                                            mask_edit=f"imported;brain={brain_from or 'given'}")])
        except InputError as e:
            problems.append(str(e))
    if problems:
        raise InputError(src, f"{len(problems)} of {len(files)} mask(s) not imported (the others are in "
                              f"{manifest}; rerun after fixing, it resumes):\n  " + "\n  ".join(problems),
                         kind="bad-mask")
    return manifest

"""New conditioning masks from existing ones (the paper's source of new synthesis conditions).

Three edits of a label map (0 bg, 1 NCR, 2 ED, 3 ET, 4 brain):
- ``scale_tumour``: scale the tumour about its centroid (nearest neighbour keeps the labels crisp);
- ``shift_tumour``: move it by a voxel offset inside the brain;
- ``transplant_tumour``: put one case's tumour into another case's brain (same grid).
The old tumour becomes brain (4); new tumour voxels outside the brain are dropped. An edit is rejected
(``EditRejected``) when less than ``min_inside`` of the moved tumour stays inside the brain or fewer than
``min_voxels`` tumour voxels remain.

``edit_masks`` writes each edited mask as a label NIfTI with its parent's affine plus a manifest row with
source "mask", parent_case_id, mask_edit ("scale:1.50", "shift:+2,0,-1", "transplant:from=<case>") and
the parent's split.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from core.errors import InputError, ConfigError
from .labels import BRAIN, brain_mask, tumour_mask
from .volume import spacing_of

DEFAULT_MIN_VOXELS = 30
DEFAULT_MIN_INSIDE = 0.5
EDIT_KINDS = ("scale", "shift", "transplant")


class EditRejected(ValueError):
    """An edit that breaks the rules (too little tumour left, or too much of it outside the brain)."""


def _tumour_only(label: np.ndarray) -> np.ndarray:
    return np.where(tumour_mask(label), label, 0).astype(np.uint8)


def _place(brain: np.ndarray, moved_tumour: np.ndarray, min_inside: float, min_voxels: int, what: str,
           n_reference: int | None = None, where: str = "the brain") -> np.ndarray:
    """Compose brain (4) + tumour labels kept inside the brain, applying the acceptance rules.

    The inside fraction is kept / n_reference (the tumour's size before the edit, so voxels moved off the
    grid count as outside) or kept / moved voxels.
    """
    moved = moved_tumour > 0
    n_moved = int(moved.sum())
    kept = moved & brain
    n_kept = int(kept.sum())
    n_ref = n_reference if n_reference is not None else n_moved
    if n_ref == 0 or n_kept / n_ref < min_inside:
        frac = n_kept / n_ref if n_ref else 0.0
        raise EditRejected(f"{what}: only {frac:.0%} of the tumour stays inside {where} (need {min_inside:.0%})")
    if n_kept < min_voxels:
        raise EditRejected(f"{what}: {n_kept} tumour voxels remain (need {min_voxels})")
    out = np.where(brain, BRAIN, 0).astype(np.uint8)
    out[kept] = moved_tumour[kept]
    return out


def _check_has_tumour(label: np.ndarray, what: str) -> None:
    if not tumour_mask(label).any():
        raise EditRejected(f"{what}: the parent mask has no tumour")


def scale_tumour(label: np.ndarray, factor: float, *, min_voxels: int = DEFAULT_MIN_VOXELS,
                 min_inside: float = DEFAULT_MIN_INSIDE) -> np.ndarray:
    """Scale the tumour about its centroid by ``factor`` (volume changes by about factor**3)."""
    if not 0.1 <= factor <= 10:
        raise ValueError(f"scale factor {factor} outside [0.1, 10]")
    what = f"scale:{factor:.2f}"
    _check_has_tumour(label, what)
    tum = _tumour_only(label)
    centre = np.argwhere(tum > 0).mean(0)
    # output voxel x samples input voxel centre + (x - centre) / factor; order=0 = nearest neighbour
    matrix = np.eye(3) / factor
    offset = centre - matrix @ centre
    scaled = ndimage.affine_transform(tum, matrix, offset=offset, order=0, mode="constant", cval=0)
    return _place(brain_mask(label), scaled, min_inside, min_voxels, what)


def _shift_array(a: np.ndarray, offset) -> np.ndarray:
    """Integer shift without wrap-around (voxels moved off the grid are lost)."""
    out = np.zeros_like(a)
    src, dst = [], []
    for o, n in zip(offset, a.shape):
        o = int(o)
        if abs(o) >= n:
            return out
        src.append(slice(max(0, -o), n - max(0, o)))
        dst.append(slice(max(0, o), n - max(0, -o)))
    out[tuple(dst)] = a[tuple(src)]
    return out


def format_offset(offset) -> str:
    return ",".join(f"{int(o):+d}" if int(o) else "0" for o in offset)


def shift_tumour(label: np.ndarray, offset, *, min_voxels: int = DEFAULT_MIN_VOXELS,
                 min_inside: float = DEFAULT_MIN_INSIDE) -> np.ndarray:
    """Move the tumour by an integer voxel ``offset`` (x, y, z); keep it only if it stays in the brain.

    The fraction inside is measured against the tumour's full size, so voxels pushed off the grid count
    as outside.
    """
    offset = tuple(int(o) for o in offset)
    what = f"shift:{format_offset(offset)}"
    _check_has_tumour(label, what)
    tum = _tumour_only(label)
    return _place(brain_mask(label), _shift_array(tum, offset), min_inside, min_voxels, what,
                  n_reference=int((tum > 0).sum()))


def transplant_tumour(donor: np.ndarray, recipient: np.ndarray, offset=(0, 0, 0), *,
                      min_voxels: int = DEFAULT_MIN_VOXELS, min_inside: float = DEFAULT_MIN_INSIDE) -> np.ndarray:
    """The donor's tumour (same grid, optionally shifted) in the recipient's brain; the recipient's own
    tumour becomes brain."""
    if donor.shape != recipient.shape:
        raise ValueError(f"donor shape {donor.shape} differs from recipient shape {recipient.shape}")
    what = "transplant"
    _check_has_tumour(donor, what)
    tum = _tumour_only(donor)
    return _place(brain_mask(recipient), _shift_array(tum, offset), min_inside, min_voxels, what,
                  n_reference=int((tum > 0).sum()), where="the recipient brain")


@dataclass(frozen=True)
class _EditRules:
    """What ``edit_masks`` may draw (kinds, scale range, largest shift) and which edits it keeps."""

    kinds: tuple[str, ...]
    scale_range: tuple[float, float]
    max_shift_mm: float
    min_voxels: int
    min_inside: float
    max_tries: int

    def __post_init__(self):
        unknown = set(self.kinds) - set(EDIT_KINDS)
        if unknown or not self.kinds:
            raise ConfigError(f"unknown edit kinds {sorted(unknown)}; choose from {EDIT_KINDS}", kind="bad-argument")
        lo, hi = self.scale_range
        if not 0.1 <= lo <= hi <= 10:
            raise ConfigError(f"bad scale range {self.scale_range}", kind="bad-argument")


def _try_edit(rng: np.random.Generator, kind: str, rules: _EditRules, lab: np.ndarray, aff: np.ndarray,
              donors: list[str], labels) -> tuple[np.ndarray, str]:
    """One random edit of ``kind`` and its mask_edit text; raises EditRejected if it breaks the rules.
    labels(case_id) -> (label map, affine) reads the transplant donors."""
    rule = dict(min_voxels=rules.min_voxels, min_inside=rules.min_inside)
    if kind == "scale":
        lo, hi = rules.scale_range
        f = float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        return scale_tumour(lab, f, **rule), f"scale:{f:.2f}"
    if kind == "shift":
        max_shift = np.maximum(np.round(rules.max_shift_mm / np.asarray(spacing_of(aff))), 1).astype(int)
        off = tuple(int(rng.integers(-m, m + 1)) for m in max_shift)
        return shift_tumour(lab, off, **rule), f"shift:{format_offset(off)}"
    if not donors:
        raise EditRejected("transplant: no other case to take a tumour from")
    donor = donors[int(rng.integers(len(donors)))]
    dlab, daff = labels(donor)
    if dlab.shape != lab.shape or not np.allclose(daff, aff, atol=1e-3):
        raise EditRejected(f"transplant: {donor} is on another grid")
    return transplant_tumour(dlab, lab, **rule), f"transplant:from={donor}"


def _random_edit(rng: np.random.Generator, rules: _EditRules, lab: np.ndarray, aff: np.ndarray, donors: list[str],
                 labels, label_path: Path) -> tuple[np.ndarray, str]:
    """Draw edits until one passes the rules (at most ``rules.max_tries``); InputError naming the parent if none."""
    reasons = []
    for _ in range(rules.max_tries):
        kind = rules.kinds[int(rng.integers(len(rules.kinds)))]
        try:
            return _try_edit(rng, kind, rules, lab, aff, donors, labels)
        except EditRejected as e:
            reasons.append(str(e))
    raise InputError(label_path, f"no valid mask edit in {rules.max_tries} tries (last: {reasons[-3:]})",
                     kind="edit-failed")


def edit_masks(manifest: str | Path, out_dir: str | Path, n_per_case: int, seed: int, split: str | None = "train",
               *, kinds: tuple[str, ...] = EDIT_KINDS, scale_range: tuple[float, float] = (0.5, 2.0),
               max_shift_mm: float = 30.0, min_voxels: int = DEFAULT_MIN_VOXELS,
               min_inside: float = DEFAULT_MIN_INSIDE, max_tries: int = 25, progress: bool = True) -> Path:
    """Make ``n_per_case`` edited masks for every real case of ``split`` (None = all splits).

    Writes ``out_dir/<parent>_edit<k>/<id>_seg.nii.gz`` and ``out_dir/data_manifest.csv`` (rows with
    source "mask"); returns the manifest path. Deterministic for a seed; cases already in the output
    manifest are skipped (resumable). Transplant donors come from the parent's own split, so test
    tumours never leak into training masks. A case that yields no valid edit in ``max_tries`` attempts
    raises InputError; unknown edit kinds or a bad scale range raise ConfigError.
    """
    from tqdm import tqdm

    from .manifest import append_rows, load_manifest, make_row, resolve, select
    from .nifti import read_label, write_array

    rules = _EditRules(kinds, scale_range, max_shift_mm, min_voxels, min_inside, max_tries)
    manifest = Path(manifest)
    df = select(load_manifest(manifest), source="real", split=split)
    if len(df) == 0:
        raise InputError(manifest, f"no real cases with split {split!r} to edit", kind="empty-selection")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    out_manifest = out / "data_manifest.csv"
    done = set(load_manifest(out_manifest)["case_id"]) if out_manifest.exists() else set()
    ids, splits = df["case_id"].tolist(), df["split"].tolist()
    label_of = df.drop_duplicates("case_id").set_index("case_id")["label"]

    @functools.cache  # transplant donors are read again and again
    def labels(cid: str) -> tuple[np.ndarray, np.ndarray]:
        return read_label(resolve(manifest, label_of[cid]))

    for ci, (_, row) in enumerate(tqdm(list(df.iterrows()), desc="edit masks", unit="case", disable=not progress)):
        parent = str(row["case_id"])
        lab, aff = labels(parent)
        # donors: other cases of the parent's own split (no tumour crosses splits)
        donors = [d for d, sp in zip(ids, splits) if d != parent and sp == row["split"]]
        for k in range(n_per_case):
            cid = f"{parent}_edit{k:02d}"
            if cid in done:
                continue
            # one stream per (seed, parent index, edit index): resuming or adding cases changes nothing else
            rng = np.random.default_rng(np.random.SeedSequence([seed, ci, k]))
            new, edit = _random_edit(rng, rules, lab, aff, donors, labels, resolve(manifest, row["label"]))
            path = write_array(out / cid / f"{cid}_seg.nii.gz", new, aff)
            append_rows(out_manifest, [make_row(
                out_manifest, case_id=cid, cohort=row["cohort"], source="mask", split=row["split"], images={},
                label=path, shape=new.shape, spacing=spacing_of(aff), parent_case_id=parent, mask_edit=edit)])
    return out_manifest

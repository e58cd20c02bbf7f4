"""NIfTI read/write. The only module that touches nibabel files; every write is atomic."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import CohortError
from .fsutil import atomic_path
from .labels import ALLOWED_LABELS
from .volume import Volume, spacing_of


def read_array(path: str | Path, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI as (array, affine), raising CohortError naming the file for any defect.

    A trailing singleton 4th axis (common in atlases) is squeezed; any other non-3-D image is refused.
    NaN or Inf voxels are refused.
    """
    path = Path(path)
    if not path.exists():
        raise CohortError(path, "file does not exist", kind="missing-file")
    try:
        img = nib.load(str(path))
        shape = img.shape
        if len(shape) == 4 and shape[3] == 1:
            arr = np.asarray(img.dataobj)[..., 0]
        elif len(shape) != 3:
            raise CohortError(path, f"expected a 3-D image, got shape {tuple(shape)}", kind="not-3d")
        else:
            arr = np.asarray(img.dataobj)
        affine = img.affine
    except CohortError:
        raise
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError) as e:
        raise CohortError(path, f"unreadable or truncated file ({type(e).__name__}: {e})", kind="unreadable") from e
    except Exception as e:  # nibabel raises ImageFileError / ValueError for garbage headers
        raise CohortError(path, f"not a readable NIfTI image ({type(e).__name__}: {e})", kind="unreadable") from e
    arr = np.asarray(arr, dtype=dtype)
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise CohortError(path, f"contains {n_bad} NaN or Inf voxels", kind="non-finite")
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise CohortError(path, "has no valid affine (singular or non-finite)", kind="bad-affine")
    return arr, affine


def write_array(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3-D array as NIfTI atomically (temporary name, then rename). Integer arrays stay integer."""
    path = Path(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: refusing to write a {array.ndim}-D array as a 3-D NIfTI")
    if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
        array = array.astype(np.uint8 if array.max(initial=0) < 256 and array.min(initial=0) >= 0 else np.int16)
    else:
        array = array.astype(np.float32)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def read_label(path: str | Path, *, allowed=ALLOWED_LABELS, require_tumour: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a label map, checking its values against the convention (0..4)."""
    arr, affine = read_array(path, dtype=np.float32)
    if not np.allclose(arr, np.round(arr)):
        raise CohortError(path, "label map has non-integer values", kind="bad-labels")
    lab = np.round(arr).astype(np.int16)
    bad = sorted(set(np.unique(lab).tolist()) - set(allowed))
    if bad:
        raise CohortError(path, f"label values {bad} outside the convention {sorted(allowed)}", kind="bad-labels")
    if require_tumour and not np.isin(lab, (1, 2, 3)).any():
        raise CohortError(path, "no tumour voxels (labels 1-3) where a tumour is required", kind="empty-tumour")
    return lab.astype(np.uint8), affine


def read_volume(paths: dict[str, str | Path]) -> Volume:
    """Read several modalities into one Volume, checking they share shape, affine and spacing."""
    arrays: dict[str, np.ndarray] = {}
    ref_affine = ref_shape = ref_name = None
    for name, p in paths.items():
        arr, aff = read_array(p)
        if ref_affine is None:
            ref_affine, ref_shape, ref_name = aff, arr.shape, p
        else:
            if arr.shape != ref_shape:
                raise CohortError(p, f"shape {arr.shape} differs from {ref_name} {ref_shape}", kind="shape-mismatch")
            check_same_geometry(p, aff, ref_name, ref_affine)
        arrays[name] = arr
    return Volume.from_channels(arrays, ref_affine)


def check_same_geometry(path, affine, ref_path, ref_affine, atol: float = 1e-3) -> None:
    sp, ref_sp = np.asarray(spacing_of(affine)), np.asarray(spacing_of(ref_affine))
    if not np.allclose(sp, ref_sp, atol=atol):
        raise CohortError(path, f"spacing {np.round(sp, 4).tolist()} differs from {ref_path} {np.round(ref_sp, 4).tolist()}",
                          kind="geometry-mismatch")
    if not np.allclose(affine, ref_affine, atol=atol):
        raise CohortError(path, f"affine differs from {ref_path}", kind="geometry-mismatch")


def write_volume(volume: Volume, paths: dict[str, str | Path]) -> dict[str, Path]:
    """Write each channel of a Volume to its own NIfTI file (atomic per file)."""
    return {name: write_array(paths[name], volume.channel(name), volume.affine) for name in volume.channels}

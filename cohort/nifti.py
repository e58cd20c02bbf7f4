"""NIfTI read/write. The only module that touches nibabel files; every write is atomic.

Reading checks the header before any voxel is read: a header must give a usable orientation (qform or sform
code set) and non-zero voxel spacing, and the image it implies must fit under MAX_IMAGE_BYTES and inside the
file (a lying header would otherwise make nibabel allocate whatever it claims). A .nii.gz file is read whole
and decompressed in one call (faster than nibabel's streamed gzip read: docs/decisions/0011-nifti-read-whole-file.md),
which also tells exactly how many bytes it holds. Writing is nibabel's own (zlib level 1, no time stamp or file
name in the gzip header), so a file's bytes, and a manifest's sha256 of it, follow from the array and the zlib
Python is built with, not from the CPU: ISA-L's faster gzip was tried and withdrawn because CI's machine wrote other
bytes than ours (docs/decisions/0021-nifti-write-isal-gzip.md).
"""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from core.errors import InputError
from core.fsutil import atomic_path
from .labels import ALLOWED_LABELS
from .volume import Volume, spacing_of

# the largest image (header-implied voxel bytes) we read: a 4-D 240x240x155x4 float32 BraTS image is 143 MB
MAX_IMAGE_BYTES = 2 * 1024 ** 3
# deflate cannot expand data more than 1032:1, so a header claiming more than that is lying
_MAX_DEFLATE_RATIO = 1032


def _fmt_bytes(n: int) -> str:
    return f"{n / 1024 ** 3:.1f} GiB" if n >= 1024 ** 3 else f"{n / 1024 ** 2:.1f} MiB"


def _check_header(path: Path, img) -> int:
    """Refuse a header with no orientation, zero spacing or an implausible size; return the implied file size."""
    header = img.header
    if isinstance(header, nib.Nifti1Header):  # Nifti2Header is a subclass
        # nibabel silently turns zero pixdims into 1 mm on load; read the header as it is on disk
        with nib.openers.Opener(str(path)) as f:
            raw = type(header).from_fileobj(f, check=False)
        if int(raw["qform_code"]) == 0 and int(raw["sform_code"]) == 0:
            raise InputError(path, "header has no usable orientation (qform_code and sform_code are both 0); "
                                    "re-save it with its real affine", kind="bad-header")
        n_spatial = min(3, max(1, int(raw["dim"][0])))
        pixdim = np.asarray(raw["pixdim"][1:1 + n_spatial], dtype=np.float64)
        if not np.isfinite(pixdim).all() or (pixdim == 0).any():
            raise InputError(path, f"header voxel spacing pixdim[1:{1 + n_spatial}] = {pixdim.tolist()} has zero "
                                    "or non-finite values", kind="bad-header")
        offset = int(raw.get_data_offset())
    else:
        offset = 0
    shape = tuple(int(s) for s in header.get_data_shape())
    n_bytes = int(np.prod(shape, dtype=np.float64) * np.dtype(header.get_data_dtype()).itemsize)
    claim = (f"header claims a {'x'.join(map(str, shape))} {np.dtype(header.get_data_dtype())} image "
             f"({_fmt_bytes(n_bytes)})")
    if n_bytes > MAX_IMAGE_BYTES:
        raise InputError(path, f"{claim}, more than the {_fmt_bytes(MAX_IMAGE_BYTES)} limit", kind="too-large")
    size = path.stat().st_size
    implied = offset + n_bytes
    if path.name.endswith(".gz"):
        if implied > size * _MAX_DEFLATE_RATIO:
            raise InputError(path, f"{claim} but the file has only {size} compressed bytes", kind="size-mismatch")
    elif implied > size:
        raise InputError(path, f"{claim} but the file has only {size} bytes", kind="size-mismatch")
    return implied


def _load(path: str | Path):
    """The image with its voxels in memory, after the header checks; InputError naming the file otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist", kind="missing-file")
    try:
        img = nib.load(str(path))  # header only: nibabel reads voxels lazily
        implied = _check_header(path, img)
        if path.name.endswith(".gz") and isinstance(img, nib.Nifti1Image):
            raw = nifti_bytes(path)
            if len(raw) < implied:
                raise InputError(path, f"truncated: the header implies {implied} bytes but the file holds "
                                        f"{len(raw)}", kind="unreadable")
            img = type(img).from_bytes(raw)
        data = np.asarray(img.dataobj)
    except InputError:
        raise
    except (gzip.BadGzipFile, zlib.error, EOFError, OSError) as e:
        raise InputError(path, f"unreadable or truncated file ({type(e).__name__}: {e})", kind="unreadable") from e
    except Exception as e:  # nibabel raises ImageFileError / ValueError for garbage headers
        raise InputError(path, f"not a readable NIfTI image ({type(e).__name__}: {e})", kind="unreadable") from e
    affine = img.affine
    if affine is None or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "has no valid affine (singular or non-finite)", kind="bad-affine")
    return data, affine


def nifti_bytes(path: str | Path) -> bytes:
    """A NIfTI file's content, header and voxels: the file itself for a .nii, decompressed for a .nii.gz. Two files
    with the same content can differ in their gzip bytes (another zlib, or another level); their content cannot."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file does not exist", kind="missing-file")
    if not path.name.endswith(".gz"):
        return path.read_bytes()
    try:
        return gzip.decompress(path.read_bytes())
    except (gzip.BadGzipFile, zlib.error, EOFError) as e:
        raise InputError(path, f"unreadable or truncated file ({type(e).__name__}: {e})", kind="unreadable") from e


def _check_finite(path, arr: np.ndarray, what: str = "") -> None:
    if not np.isfinite(arr).all():
        n_bad = int((~np.isfinite(arr)).sum())
        raise InputError(path, f"{what}contains {n_bad} NaN or Inf voxels", kind="non-finite")


def read_array(path: str | Path, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3-D NIfTI as (array, affine), raising InputError naming the file for any defect.

    A trailing singleton 4th axis (common in atlases) is squeezed; any other non-3-D image is refused.
    NaN or Inf voxels are refused, and so are the header defects listed in the module docstring.
    """
    data, affine = _load(path)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    elif data.ndim != 3:
        raise InputError(path, f"expected a 3-D image, got shape {tuple(data.shape)}", kind="not-3d")
    arr = np.asarray(data, dtype=dtype)
    _check_finite(path, arr)
    return arr, affine


def read_channels(path: str | Path, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Read a multi-channel image (a 4-D NIfTI, channels on the 4th axis, as in the Medical Segmentation
    Decathlon) as ((C, X, Y, Z) array, affine). A 3-D image gives one channel; 5-D and up are refused."""
    data, affine = _load(path)
    if data.ndim == 3:
        data = data[..., None]
    elif data.ndim != 4:
        raise InputError(path, f"expected a 3-D or 4-D image, got shape {tuple(data.shape)}", kind="not-3d")
    arr = np.ascontiguousarray(np.moveaxis(np.asarray(data, dtype=dtype), -1, 0))
    _check_finite(path, arr)
    return arr, affine


def write_array(path: str | Path, array: np.ndarray, affine: np.ndarray) -> Path:
    """Write a 3-D array as a .nii.gz (or .nii) NIfTI atomically (temporary name, then rename). Integer arrays stay
    integer. The gzip stream has no time stamp or file name: the same array gives the same bytes."""
    path = Path(path)
    array = np.asarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: refusing to write a {array.ndim}-D array as a 3-D NIfTI")
    if not path.name.endswith((".nii", ".nii.gz")):
        raise ValueError(f"{path}: a NIfTI file name ends in .nii.gz or .nii")
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


def read_label(path: str | Path, *, allowed=ALLOWED_LABELS, require_tumour: bool = False
               ) -> tuple[np.ndarray, np.ndarray]:
    """Read a label map, checking its values against the convention (0..4)."""
    arr, affine = read_array(path, dtype=np.float32)
    return checked_labels(path, arr, allowed=allowed, require_tumour=require_tumour), affine


def checked_labels(path: str | Path, arr: np.ndarray, *, allowed=ALLOWED_LABELS, require_tumour: bool = False
                   ) -> np.ndarray:
    """read_label's checks and result (uint8) for a label map already read from ``path`` (named in the errors)."""
    if not np.allclose(arr, np.round(arr)):
        raise InputError(path, "label map has non-integer values", kind="bad-labels")
    lab = np.round(arr).astype(np.int16)
    bad = sorted(set(np.unique(lab).tolist()) - set(allowed))
    if bad:
        raise InputError(path, f"label values {bad} outside the convention {sorted(allowed)}", kind="bad-labels")
    if require_tumour and not np.isin(lab, (1, 2, 3)).any():
        raise InputError(path, "no tumour voxels (labels 1-3) where a tumour is required", kind="empty-tumour")
    return lab.astype(np.uint8)


def read_volume(paths: dict[str, str | Path | tuple[str | Path, int]]) -> Volume:
    """Read several modalities into one Volume, checking they share shape, affine and spacing.

    Each value is a 3-D file, or (file, channel index) for one channel of a 4-D file (each 4-D file is read once).
    """
    arrays: dict[str, np.ndarray] = {}
    multi: dict[Path, tuple[np.ndarray, np.ndarray]] = {}
    ref_affine = ref_shape = ref_name = None
    for name, source in paths.items():
        if isinstance(source, tuple):
            p, channel = Path(source[0]), int(source[1])
            if p not in multi:
                multi[p] = read_channels(p)
            channels, aff = multi[p]
            if not 0 <= channel < len(channels):
                raise InputError(p, f"has {len(channels)} channels; channel {channel} ({name}) does not exist",
                                  kind="missing-modality")
            arr = channels[channel]
        else:
            p = source
            arr, aff = read_array(p)
        if ref_affine is None:
            ref_affine, ref_shape, ref_name = aff, arr.shape, p
        else:
            if arr.shape != ref_shape:
                raise InputError(p, f"shape {arr.shape} differs from {ref_name} {ref_shape}", kind="shape-mismatch")
            check_same_geometry(p, aff, ref_name, ref_affine)
        arrays[name] = arr
    return Volume.from_channels(arrays, ref_affine)


def check_same_geometry(path, affine, ref_path, ref_affine, atol: float = 1e-3) -> None:
    sp, ref_sp = np.asarray(spacing_of(affine)), np.asarray(spacing_of(ref_affine))
    if not np.allclose(sp, ref_sp, atol=atol):
        raise InputError(path, f"spacing {np.round(sp, 4).tolist()} differs from {ref_path} "
                               f"{np.round(ref_sp, 4).tolist()}", kind="geometry-mismatch")
    if not np.allclose(affine, ref_affine, atol=atol):
        raise InputError(path, f"affine differs from {ref_path}", kind="geometry-mismatch")


def write_volume(volume: Volume, paths: dict[str, str | Path]) -> dict[str, Path]:
    """Write each channel of a Volume to its own NIfTI file (atomic per file)."""
    return {name: write_array(paths[name], volume.channel(name), volume.affine) for name in volume.channels}

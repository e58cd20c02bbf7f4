"""Run identity, written one way: a config's ``identity()`` is the plain dict of the settings that define its result,
and its hash is ``content_hash`` of that dict (MedDDPMConfig.hash, SegmenterConfig.hash, StudyParams.study_key).
Equal settings give equal hashes on every machine; a resumed run or a reused result is checked against them."""
from __future__ import annotations

import json

from .fsutil import sha256_bytes


def content_hash(obj) -> str:
    """sha256 (hex) of ``obj`` as canonical JSON: keys sorted, tuples as lists, other non-JSON values by str().
    The format of every stored identity: changing it changes every config hash and study key."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str).encode())

"""Run identity (core.identity): every config's hash is content_hash of its identity(), and the values of existing
runs never change by accident. The pinned values were computed before the configs moved to core.identity; a change
that alters one makes existing generators refuse to resume, segmenter folders refuse their config and studies get a
new key: change a pin only on purpose, and say so."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from core.identity import content_hash

MEDDDPM_HASHES = {  # MedDDPMConfig.hash() of each synth profile
    "tiny": "851d7a9e52403a1817bd05e535bb62e1fda860c02455ace0bbce46ae8677a918",
    "demo": "ab63ca246652257fd9fc394a5d1132f2a800872e71c4ef1de650ab444f7c1a6f",
    "paper-wholehead": "df22680cf155e2aeb63cfe2ce4bb82b80f6e65c704f314c2209adabc5261b172",
    "paper-brats": "d4bc499ad9a2a0688261454cca19074ae4967868becd137701c57bf4e40c7076",
    "authors-brats": "f2daed182200f8c28560e25225f8b757ae0172b71a9a6832032eb92a4c55e5c7",
    "authors-wholehead": "0df20949806263205e5e15c5933baf92a8e4a21fa41ca770332f3585baca7172",
}
SEGMENTER_HASHES = {  # content_hash of SegmenterConfig(backend, profile).resolved().identity()
    ("monai", "tiny"): "55661b8b967e21253f4821c9365cc894e4f5975c20887d40e5642f74ca8a771a",
    ("monai", "demo"): "248719f6f20fa261e29adca0af8478b740edfbb342e0939b2d776ce89618ca06",
    ("monai", "paper"): "917e756d5f3582848e8d9c4ea0f07ad0283613d86b66a8f3502532a93b10afaf",
    ("nnunet", "tiny"): "a6125902636fa22d0898ab4b304e21f7542441a8d0a5aa643ed79948f479a8af",
    ("nnunet", "demo"): "62f010d004621fc30d493a16f3c8577df3b72cb675b4e5781f0a6ac6c15f3c00",
    ("nnunet", "paper"): "6138cf4c826236a500fe0d9595b6dd563380f8df672823e906421ac438f8e6a7",
}


def test_content_hash_is_the_sha256_of_canonical_json():
    want = hashlib.sha256(b'{"a": [1, 2], "b": {"c": null, "d": 0.5}}').hexdigest()
    assert content_hash({"b": {"d": 0.5, "c": None}, "a": (1, 2)}) == want


def test_medddpm_config_hashes_are_pinned():
    from synth.config import PROFILES, MedDDPMConfig

    assert MedDDPMConfig().hash() == "4d9b17f703c9ec6816291c7451940d8fd636987920488a2f7927ffe15343198e"
    assert {name: cfg.hash() for name, cfg in PROFILES.items()} == MEDDDPM_HASHES
    assert all(cfg.hash() == content_hash(cfg.identity()) for cfg in PROFILES.values())


def test_medddpm_hash_counts_init_from_by_the_recorded_sha256_and_never_reads_the_file(tmp_path):
    from synth.config import MedDDPMConfig, get_config

    demo = get_config("demo")
    gen = tmp_path / "generator.safetensors"
    gen.write_bytes(b"weights")
    by_path = demo.replace(init_from=str(gen)).hash()
    gen.unlink()
    assert demo.replace(init_from=str(gen)).hash() == by_path  # without init_from_sha256: the path string
    pinned = demo.replace(init_from=str(gen), init_from_sha256="ab" * 32)
    assert pinned.identity()["init_from"] == "sha256:" + "ab" * 32 and "init_from_sha256" not in pinned.identity()
    moved = pinned.replace(init_from=str(tmp_path / "moved.safetensors"), init_from_sha256="ab" * 32)
    assert moved.hash() == pinned.hash() != by_path  # the content counts, not where the file lies
    assert pinned.replace(init_from="other.safetensors").init_from_sha256 is None  # a new file drops the old sha
    # written with the config (generator metadata, config.json) where set, so a loaded config gives the same hash
    assert MedDDPMConfig.from_dict(json.loads(pinned.to_json())).hash() == pinned.hash()
    assert "init_from_sha256" not in demo.to_dict()  # unset: configs serialise as before the field existed


def test_segmenter_config_hashes_are_pinned_and_the_config_is_frozen():
    from segment.config import SegmenterConfig

    got = {(b, p): SegmenterConfig(backend=b, profile=p).resolved().hash() for b, p in SEGMENTER_HASHES}
    assert got == SEGMENTER_HASHES
    assert SegmenterConfig().hash() == "abc8bc0ca79a140e67d431c36ffed1b14d183610efdd175434462f5f3e1bd9d8"
    raw = SegmenterConfig(profile="tiny")
    resolved = raw.resolved()
    assert raw.epochs is None and resolved.epochs is not None  # resolved() makes a new config
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.seed = 1
    assert resolved.replace(device="cpu").hash() == resolved.hash() != resolved.replace(seed=1).hash()


def test_study_keys_are_pinned():
    from flows.plan import StudyParams

    assert StudyParams().study_key == "augment-study:e8b15c23773e"
    assert (StudyParams(mixes=["1:1", "1:2@edited"], backends=["monai", "nnunet"]).study_key
            == "augment-study:a28914e71544")

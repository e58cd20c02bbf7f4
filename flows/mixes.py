"""Training mixes of a study: "R:S[@masks]" = real to synthetic ratio, synthetic images conditioned on the
masks of the real training cases ("real", the default) or on edited versions of them ("edited").

With n_real real training cases, mix R:S uses n_real real cases (none if R = 0) and round(n_real * S / max(R, 1))
synthetic ones. The paper's composition (Med-DDPM, issue #19 of its repository): real only ("1:0"), synthetic
from the same masks only ("0:1"), real + synthetic from the same masks ("1:1") and real + twice as many
synthetic from scaled/shifted masks ("1:2@edited").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from core.errors import ConfigError

MASK_SOURCES = ("real", "edited")
# real only, synthetic only, real + 2x synthetic on edited masks (the paper's headline composition). 1:1 is left
# out of the default so that three seeds of the demo's DynUNet fit the 20-minute study; --mixes adds it back.
DEFAULT_MIXES = ("1:0", "0:1", "1:2@edited")
_MIX_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:@\s*(\w+))?\s*$")


@dataclass(frozen=True)
class Mix:
    real: int
    synth: int
    masks: str = "real"

    @classmethod
    def parse(cls, text: str) -> "Mix":
        m = _MIX_RE.match(str(text))
        if not m:
            raise ConfigError(f"mix {text!r} is not of the form 'R:S' or 'R:S@real|edited' (e.g. '1:2@edited')")
        real, synth, masks = int(m.group(1)), int(m.group(2)), (m.group(3) or "real")
        if masks not in MASK_SOURCES:
            raise ConfigError(f"mix {text!r}: mask source {masks!r} not in {MASK_SOURCES}")
        if real == 0 and synth == 0:
            raise ConfigError(f"mix {text!r} has neither real nor synthetic cases")
        return cls(real, synth, masks)

    @property
    def label(self) -> str:
        """Canonical text, e.g. '1:2@edited' ('@real' omitted, and for real-only mixes)."""
        return f"{self.real}:{self.synth}" + (f"@{self.masks}" if self.synth and self.masks != "real" else "")

    @property
    def slug(self) -> str:
        """File-name form, e.g. 'r1-s2-edited'."""
        return f"r{self.real}-s{self.synth}" + (f"-{self.masks}" if self.synth and self.masks != "real" else "")

    def counts(self, n_real: int) -> tuple[int, int]:
        """(real cases, synthetic cases) of this mix for a study with n_real real training cases."""
        if self.real == 0:
            return 0, n_real * self.synth
        return n_real, int(round(n_real * self.synth / self.real))


def parse_mixes(mixes) -> list[Mix]:
    out = [m if isinstance(m, Mix) else Mix.parse(m) for m in mixes]
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"mixes {dup} given twice")
    if not out:
        raise ConfigError("no mixes given")
    return out


@dataclass(frozen=True)
class SynthesisPlan:
    """How many synthetic cases each mask source must provide: the largest count any mix needs. Every mix
    takes a prefix of its pool, so a 1:1 mix reuses the first half of the 1:2 mix's cases."""

    from_real_masks: int
    from_edited_masks: int
    edits_per_case: int  # edited masks to make per real training case

    @classmethod
    def for_mixes(cls, mixes: list[Mix], n_real: int) -> "SynthesisPlan":
        need = {s: max([m.counts(n_real)[1] for m in mixes if m.masks == s] or [0]) for s in MASK_SOURCES}
        edits = math.ceil(need["edited"] / n_real) if need["edited"] and n_real else 0
        return cls(need["real"], need["edited"], edits)

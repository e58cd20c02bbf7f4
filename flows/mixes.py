"""Training mixes of a study: "R:S[@masks]" = real to synthetic ratio, synthetic images conditioned on the
masks of the real training cases ("real", the default) or on edited versions of them ("edited").

With n_real real training cases, mix R:S uses n_real real cases (none if R = 0) and round(n_real * S / max(R, 1))
synthetic ones. The paper's composition (Med-DDPM, issue #19 of its repository): real only ("1:0"), synthetic
from the same masks only ("0:1"), real + synthetic from the same masks ("1:1") and real + twice as many
synthetic from scaled/shifted masks ("1:2@edited").

"A>B" is a staged arm: the segmenter trains on mix A (pre-training, e.g. the synthetic pool alone), then starts
from those weights and trains on mix B (fine-tuning, e.g. the real cases): "0:1>1:0" = synthetic pre-training,
real fine-tuning (docs/decisions/0020-pretrain-finetune-arm.md). A study reuses its own run of A as the
pre-training when A is one of its mixes.
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
    pretrain: "Mix | None" = None  # staged arm: the mix trained first, whose weights this mix fine-tunes

    @classmethod
    def parse(cls, text: str) -> "Mix":
        parts = str(text).split(">")
        if len(parts) > 2:
            raise ConfigError(f"mix {text!r}: one '>' at most ('PRETRAIN>FINETUNE', e.g. '0:1>1:0')")
        if len(parts) == 2:
            try:
                first, then = cls.parse(parts[0]), cls.parse(parts[1])
            except ConfigError as e:
                raise ConfigError(f"mix {text!r}: {e}") from e
            if first.synth == 0:
                raise ConfigError(f"mix {text!r}: the pre-training mix {first.label!r} has no synthetic cases; "
                                  "pre-train on a synthetic pool (e.g. '0:1>1:0')")
            if then.real == 0:
                raise ConfigError(f"mix {text!r}: the fine-tuning mix {then.label!r} has no real cases; fine-tune "
                                  "on the real cases (e.g. '0:1>1:0')")
            return cls(then.real, then.synth, then.masks, pretrain=first)
        m = _MIX_RE.match(str(text))
        if not m:
            raise ConfigError(f"mix {text!r} is not of the form 'R:S', 'R:S@real|edited' or 'PRETRAIN>FINETUNE' "
                              "(e.g. '1:2@edited', '0:1>1:0')")
        real, synth, masks = int(m.group(1)), int(m.group(2)), (m.group(3) or "real")
        if masks not in MASK_SOURCES:
            raise ConfigError(f"mix {text!r}: mask source {masks!r} not in {MASK_SOURCES}")
        if real == 0 and synth == 0:
            raise ConfigError(f"mix {text!r} has neither real nor synthetic cases")
        return cls(real, synth, masks)

    @property
    def label(self) -> str:
        """Canonical text, e.g. '1:2@edited' ('@real' omitted, and for real-only mixes), '0:1>1:0'."""
        own = f"{self.real}:{self.synth}" + (f"@{self.masks}" if self.synth and self.masks != "real" else "")
        return f"{self.pretrain.label}>{own}" if self.pretrain else own

    @property
    def slug(self) -> str:
        """File-name form, e.g. 'r1-s2-edited', 'r0-s1-then-r1-s0'."""
        own = f"r{self.real}-s{self.synth}" + (f"-{self.masks}" if self.synth and self.masks != "real" else "")
        return f"{self.pretrain.slug}-then-{own}" if self.pretrain else own

    @property
    def finetune(self) -> "Mix":
        """The mix this one trains on itself (without its pre-training stage)."""
        return Mix(self.real, self.synth, self.masks)

    @property
    def stages(self) -> list["Mix"]:
        """The single-stage mixes trained in order: [pre-training, fine-tuning] or [this mix]."""
        return [self.pretrain, self.finetune] if self.pretrain else [self]

    def counts(self, n_real: int) -> tuple[int, int]:
        """(real cases, synthetic cases) this mix trains on itself (a staged arm: its fine-tuning stage), for a
        study with n_real real training cases."""
        if self.real == 0:
            return 0, n_real * self.synth
        return n_real, int(round(n_real * self.synth / self.real))

    def seen(self, n_real: int) -> tuple[int, int]:
        """(real cases, synthetic cases) over all stages (per_case.csv's n_real and n_synth): a staged arm counts
        its pre-training pool, so the report never takes it for a real-only mix."""
        counts = [m.counts(n_real) for m in self.stages]
        return max(c[0] for c in counts), sum(c[1] for c in counts)


def parse_mixes(mixes) -> list[Mix]:
    out = [m if isinstance(m, Mix) else Mix.parse(m) for m in mixes]
    labels = [m.label for m in out]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"mixes {dup} given twice")
    if not out:
        raise ConfigError("no mixes given")
    return out


def trainings_per_seed(mixes: list[Mix]) -> int:
    """Segmenter trainings per (back end, seed): one per mix, plus the pre-training of each staged arm whose first
    mix is not itself one of the mixes (a study reuses that run otherwise: flows.plan.staged_runs)."""
    own = {m.label for m in mixes}
    extra = {m.pretrain.label for m in mixes if m.pretrain is not None and m.pretrain.label not in own}
    return len(mixes) + len(extra)


@dataclass(frozen=True)
class SynthesisPlan:
    """How many synthetic cases each mask source must provide: the largest count any mix needs. Every mix
    takes a prefix of its pool, so a 1:1 mix reuses the first half of the 1:2 mix's cases."""

    from_real_masks: int
    from_edited_masks: int
    edits_per_case: int  # edited masks to make per real training case

    @classmethod
    def for_mixes(cls, mixes: list[Mix], n_real: int) -> "SynthesisPlan":
        stages = [st for m in mixes for st in m.stages]
        need = {s: max([m.counts(n_real)[1] for m in stages if m.masks == s] or [0]) for s in MASK_SOURCES}
        edits = math.ceil(need["edited"] / n_real) if need["edited"] and n_real else 0
        return cls(need["real"], need["edited"], edits)

"""The study as a plan: what augment-study will make and train, decided from its parameters and the real cohort
before any work runs. Pure (reads manifests, imports no Prefect), so it is tested without a flow.

    params = StudyParams(mixes=["1:0", "0:1"], n_real=8)       # bad settings -> ConfigError
    plan = plan_study(params, "STUDY/cohort/data_manifest.csv", "STUDY")
    plan.pools        # synthetic pools to make: count, seed, conditioning masks
    plan.runs         # one segmenter per (mix, back end, seed): its real cases and how many synthetic ones (a staged
                      # arm "0:1>1:0": a fine-tuning run whose pretrain_run is the study's 0:1 run of that seed)
    plan.test_sets    # the real test split (+ an external cohort)
    plan.judge        # the real-only MONAI run whose model judges the synthetic images
    plan.holdout      # samples on held-out masks (fidelity and memorisation references; never trains a segmenter)
    plan.jobs(pool_orders)  # after synthesis: each run's case ids, given each pool in gate-policy order (pool_order)

flows/study.py runs the plan as Prefect tasks (docs/flows.md).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from core.errors import InputError, ConfigError
from core.identity import content_hash
from synth.defaults import SAMPLER, STEPS
from synth.schedulers import DISTILLED
from synth.shipped import DEFAULT_STUDENT_STEPS, checked_shipped_file, is_shipped_file, shipped_student_path

from .mixes import DEFAULT_MIXES, Mix, SynthesisPlan, parse_mixes

GATE_POLICIES = ("fill", "exclude", "keep")
GENERATOR_DATA = ("selected", "all")
SEGMENTER_PROFILE = {"tiny": "tiny", "demo": "demo"}  # any other cohort profile trains the "paper" budget
PRIMARY_REGIONS = ("mean", "WT", "TC", "ET")  # "mean": the mean Dice over WT, TC and ET of each test case
# fields added after study keys were published: left out of study_key while at this value, so every earlier key holds
KEY_IF_SET = {"primary": "mean", "holdout_masks": 8, "cases_from": None}
JUDGE_BACKEND = "monai"  # its predictions on the synthetic pools give their semantic consistency
MIN_HOLDOUT = 2  # held-out masks (and reference cases) below which no held-out pool is planned


@dataclass(frozen=True)
class StudyParams:
    """The parameters that define a study's results (the flow's parameters less where and how it runs: out,
    parallel, Dask, device, gpus). Meanings: the augment_study docstring and docs/flows.md. Mixes are kept as
    canonical labels."""

    cohort_manifest: str | None = None
    profile: str = "demo"
    n_cases: int = 48
    cohort_seed: int = 0
    mixes: list[str] = field(default_factory=lambda: list(DEFAULT_MIXES))
    n_real: int = 8
    backends: list[str] = field(default_factory=lambda: ["monai"])
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    external_test_manifest: str | None = None
    medddpm_checkpoint: str | None = None
    medddpm_config: dict = field(default_factory=dict)
    # the real cases Med-DDPM trains on: "selected" (the n_real every mix uses) or "all" (every real training case).
    # The name is kept: it is a key of study.json's parameters (read by eval/), of study_key and of parameter files.
    medddpm_on: str = "selected"
    medddpm_init: str = "shipped"
    sampler: str = SAMPLER
    sampling_steps: int = STEPS
    synth_seed: int = 0
    gate_failures: str = "fill"
    segmenter_config: dict = field(default_factory=dict)
    # the primary comparison: each mix vs real only on the study's test set, Dice of this region ("mean": over WT, TC
    # and ET); every other comparison of the report is secondary (eval.report, Holm-adjusted per family)
    primary: str = "mean"
    # held-out masks synthesised once each for the fidelity and memorisation references (eval.synthesis.fidelity_table,
    # eval.memorisation.memorisation_gap); 0: none. Never used to train a segmenter.
    holdout_masks: int = 8
    # a curated subset: a case list (cohort.case_list) whose rows of the real cohort the study uses; None: all.
    # study.json records the list's sha256 (flows.record); the key counts the path only
    cases_from: str | None = None

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: normalise once, here)
        set_("mixes", [m.label for m in parse_mixes(self.mixes)])
        set_("backends", list(self.backends))
        set_("seeds", list(self.seeds))
        set_("medddpm_config", dict(self.medddpm_config or {}))
        set_("segmenter_config", dict(self.segmenter_config or {}))
        if self.gate_failures not in GATE_POLICIES:
            raise ConfigError(f"gate_failures must be 'fill', 'exclude' or 'keep', not {self.gate_failures!r}")
        if self.medddpm_on not in GENERATOR_DATA:
            raise ConfigError(f"medddpm_on must be 'selected' or 'all', not {self.medddpm_on!r}")
        if self.primary not in PRIMARY_REGIONS:
            raise ConfigError(f"primary must be one of {', '.join(PRIMARY_REGIONS)}, not {self.primary!r}")
        if self.n_real < 1:
            raise ConfigError(f"n_real must be at least 1, got {self.n_real}")
        if self.holdout_masks < 0:
            raise ConfigError(f"holdout_masks must be 0 (none) or more, got {self.holdout_masks}")
        if not self.backends or not self.seeds:
            raise ConfigError("backends and seeds must each name at least one value")
        if self.sampler == DISTILLED and not self.medddpm_checkpoint:
            # the profile's shipped student of sampling_steps steps (the default 25 reads as "the default student"),
            # used as is: named here so that the study's key, record and report name the file;
            # check_generator_choice checks it against its card before any work
            steps = DEFAULT_STUDENT_STEPS if self.sampling_steps == STEPS else int(self.sampling_steps)
            shipped_student = shipped_student_path(self.profile, steps)
            if shipped_student is None:
                # a study's own generator is trained or fine-tuned with the denoising loss: never a student
                raise ConfigError(f"sampler {DISTILLED!r} samples a student made by `medddpm distill` (profile "
                                  f"{self.profile!r} ships none): pass it as "
                                  "medddpm_checkpoint (--checkpoint STUDENT/generator.safetensors; used as is, not "
                                  "fine-tuned). To distil this study's generator, run the study with another "
                                  "sampler, then `medddpm distill --checkpoint STUDY/medddpm --manifest STUDY/cohort/"
                                  f"train_n{self.n_real}_seed{self.cohort_seed}.csv --steps N --out STUDENT` (the "
                                  "selected cases: the student then saw no other real case)")
            set_("medddpm_checkpoint", str(shipped_student))

    @classmethod
    def pick(cls, values: dict) -> "StudyParams":
        """The study parameters among ``values`` (e.g. all of the flow's parameters)."""
        return cls(**{f.name: values[f.name] for f in fields(cls) if f.name in values})

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def study_key(self) -> str:
        """'augment-study:<12 hex digits>': one study per parameter set (the registry's used_by)."""
        keyed = {k: v for k, v in self.as_dict().items() if not (k in KEY_IF_SET and v == KEY_IF_SET[k])}
        return "augment-study:" + content_hash(keyed)[:12]


@dataclass(frozen=True)
class PoolPlan:
    """A synthetic pool: ``count`` cases conditioned on the selected real cases' masks ("real") or on edited
    versions of them ("edited"), written to STUDY/synthetic/<cohort_id>/."""

    name: str
    cohort_id: str
    out_dir: str
    count: int
    seed: int


@dataclass(frozen=True)
class HoldoutPlan:
    """Samples on held-out masks: one per mask of ``mask_ids`` (real cases the generator never trains on), written to
    STUDY/synthetic/<cohort_id>/; ``reference_ids``: the other held-out real cases, the real reference of the
    fidelity measure. Used by the fidelity and memorisation stages only, never by a segmenter."""

    cohort_id: str
    out_dir: str
    mask_ids: list[str]
    reference_ids: list[str]
    seed: int


@dataclass(frozen=True)
class RunPlan:
    """One segmenter: a mix, a back end, a seed; its real cases and how many cases of which pool it adds."""

    run: str
    mix: Mix
    backend: str
    seed: int
    real_ids: list[str]
    n_synth: int
    config: dict
    model_dir: str
    # a staged arm (mix "A>B"): the run of mix A (same back end and seed) whose model this run fine-tunes
    pretrain_run: str | None = None
    # False: a pre-training that is not itself one of the study's mixes, trained for its staged arm only
    evaluate: bool = True
    n_synth_seen: int | None = None  # synthetic cases over all stages (per_case.csv's n_synth); None: n_synth

    @property
    def columns(self) -> dict:
        """The columns that identify this run in per_case.csv (a staged arm counts its pre-training pool in
        n_synth: Mix.seen)."""
        n_synth = self.n_synth if self.n_synth_seen is None else self.n_synth_seen
        return {"run": self.run, "mix": self.mix.label, "n_real": len(self.real_ids), "n_synth": n_synth,
                "backend": self.backend, "seed": self.seed}


@dataclass(frozen=True)
class TestSetPlan:
    """Real cases every segmenter is evaluated on; manifest None means the study's own merged manifest."""

    name: str
    manifest: str | None
    case_ids: list[str]


@dataclass(frozen=True)
class StudyPlan:
    params: StudyParams
    study_dir: str
    train_ids: list[str]  # the n_real selected real training cases (cohort.selection)
    test_ids: list[str]
    synthesis: SynthesisPlan
    pools: list[PoolPlan]
    runs: list[RunPlan]
    test_sets: list[TestSetPlan]
    judge: str | None  # run name of the judge segmenter (None: no real-only MONAI run)
    holdout: HoldoutPlan | None = None  # samples on held-out masks (None: no generator or too few held-out cases)

    @property
    def needs_generator(self) -> bool:
        return bool(self.pools)

    @property
    def generator_train_ids(self) -> list[str] | None:
        """The real cases Med-DDPM trains on: the selected ones, or None for every real training case."""
        return list(self.train_ids) if self.params.medddpm_on == "selected" else None

    def jobs(self, pool_orders: dict[str, tuple[list[str], set[str]]]) -> list[dict]:
        """One job per run (the train-segmenters subflow's input): its case ids (real first, then a prefix of its
        pool) and how many of those synthetic cases failed the quality gate. ``pool_orders``: pool name ->
        ``pool_order(...)`` of that pool. A mix that needs more cases than its pool has (gate_failures="exclude")
        raises InputError naming the pool."""
        jobs = []
        for r in self.runs:
            ids, failed = pool_orders.get(r.mix.masks, ([], set()))
            synth_ids = ids[:r.n_synth]
            if len(synth_ids) < r.n_synth:
                pool = next(p for p in self.pools if p.name == r.mix.masks)
                raise InputError(Path(pool.out_dir) / "data_manifest.csv",
                                  f"mix {r.mix.label} needs {r.n_synth} synthetic cases but only {len(synth_ids)} "
                                  f"passed the quality gate (quality_report.csv); train Med-DDPM longer or set "
                                  f"gate_failures='keep'", kind="quality-gate")
            jobs.append({"run": r.run, "case_ids": r.real_ids + synth_ids, "config": r.config,
                         "model_dir": r.model_dir, "gate_failed_cases": len(set(synth_ids) & failed),
                         "columns": r.columns, "pretrain_run": r.pretrain_run, "evaluate": r.evaluate})
        return jobs


def plan_study(params: StudyParams, cohort_manifest: str | Path, study_dir: str | Path) -> StudyPlan:
    """The study's plan from its parameters and its real cohort (already inside ``study_dir``)."""
    from cohort.manifest import load_manifest, select
    from cohort.selection import draw_training_cases

    study, cohort_manifest = Path(study_dir).resolve(), Path(cohort_manifest)
    cohort = load_manifest(cohort_manifest)
    train_ids = sorted(draw_training_cases(cohort, params.n_real, params.cohort_seed, where=cohort_manifest)
                       ["case_id"].astype(str))
    test_ids = sorted(select(cohort, source="real", split="test")["case_id"].astype(str))
    if not test_ids:
        raise InputError(cohort_manifest, "the cohort has no real test cases (split=test)", kind="bad-selection")

    mixes = parse_mixes(params.mixes)
    synthesis = SynthesisPlan.for_mixes(mixes, params.n_real)
    pools = [PoolPlan(name, f"study-{name}-masks", str(study / "synthetic" / f"study-{name}-masks"), count, seed)
             for name, count, seed in (("real", synthesis.from_real_masks, params.synth_seed),
                                       ("edited", synthesis.from_edited_masks, params.synth_seed + 1)) if count]

    seg_profile = SEGMENTER_PROFILE.get(params.profile, "paper")
    # a non-default segmenter config gets its own run folders, so changing it on a finished study trains new
    # segmenters beside the old ones instead of colliding with them (segment refuses a model_dir of another config)
    variant = f"-cfg{content_hash(params.segmenter_config)[:6]}" if params.segmenter_config else ""
    def run_of(mix: Mix, backend: str, seed: int, **staged) -> RunPlan:
        n_r, n_s = mix.counts(params.n_real)
        run = f"{mix.slug}-{backend}-s{seed}{variant}"
        config = {"profile": seg_profile, **params.segmenter_config, "backend": backend, "seed": int(seed)}
        return RunPlan(run, mix, backend, int(seed), train_ids[:n_r], n_s, config, str(study / "segmenters" / run),
                       **staged)

    runs = [run_of(mix, b, s) for mix in mixes if mix.pretrain is None for b in params.backends for s in params.seeds]
    runs += staged_runs([m for m in mixes if m.pretrain is not None], runs, params, run_of)
    judge = next((r.run for r in runs if r.n_synth == 0 and r.backend == JUDGE_BACKEND and r.mix.pretrain is None
                  and r.evaluate), None)

    test_sets = [TestSetPlan("test", None, test_ids)]
    if params.external_test_manifest:
        test_sets.append(external_test_set(params.external_test_manifest))
    holdout = plan_holdout(params, cohort, train_ids, study) if pools else None
    return StudyPlan(params, str(study), train_ids, test_ids, synthesis, pools, runs, test_sets, judge, holdout)


def staged_runs(staged: list[Mix], planned: list[RunPlan], params: StudyParams, run_of) -> list[RunPlan]:
    """The runs of the staged arms ("A>B"), after the study's other runs (``planned``): per back end and seed, the
    fine-tuning run, which starts from the study's run of A with that back end and seed; where A is not one of the
    study's mixes, that pre-training run is planned too (trained, never evaluated: it is no arm of the study).
    Same seeds as every other mix, so the arm is seed-paired with real only."""
    out: list[RunPlan] = []
    for mix in staged:
        for backend in params.backends:
            for seed in params.seeds:
                first = next((r for r in [*planned, *out] if r.mix == mix.pretrain and r.backend == backend
                              and r.seed == int(seed)), None)
                if first is None:
                    first = run_of(mix.pretrain, backend, seed, evaluate=False)
                    out.append(first)
                seen = mix.seen(params.n_real)[1]
                out.append(run_of(mix, backend, seed, pretrain_run=first.run, n_synth_seen=seen))
    return out


def plan_holdout(params: StudyParams, cohort, train_ids: list[str], study: Path) -> HoldoutPlan | None:
    """The held-out pool: real cases the generator never trains on (with medddpm_on="selected" every real case but
    the selected ones, any split; with "all" every real case outside the train split), sorted; a seeded draw
    (synth_seed) of min(holdout_masks, half of them) gives the masks to synthesise, the rest is the real reference.
    None when holdout_masks is 0 or fewer than MIN_HOLDOUT cases would be on either side."""
    import numpy as np

    from cohort.manifest import select
    from eval.synthesis import HOLDOUT_POOL

    real = select(cohort, source="real")
    seen = set(train_ids) if params.medddpm_on == "selected" else set(real["case_id"][real["split"] == "train"])
    held = sorted(set(real["case_id"].astype(str)) - {str(c) for c in seen})
    n = min(params.holdout_masks, len(held) // 2)
    if n < MIN_HOLDOUT:
        return None
    pick = np.random.default_rng(params.synth_seed).choice(len(held), size=n, replace=False)
    masks = sorted(held[i] for i in pick)
    reference = [c for c in held if c not in set(masks)]
    return HoldoutPlan(HOLDOUT_POOL, str(study / "synthetic" / HOLDOUT_POOL), masks, reference,
                       params.synth_seed + 2)


def external_test_set(manifest: str | Path) -> TestSetPlan:
    """Every real case of another cohort, named after it (never "test", the study's own split)."""
    from cohort.manifest import load_manifest, select

    path = Path(manifest).resolve()
    df = load_manifest(path)
    ids = sorted(select(df, source="real")["case_id"].astype(str))
    name = str(df["cohort"].dropna().iloc[0]) if ids else "external"
    return TestSetPlan(name if name != "test" else "external", str(path), ids)


def pool_order(pool_manifest: str | Path, gate_failures: str) -> tuple[list[str], set[str]]:
    """(synthetic case ids in the order mixes take them, ids that failed synth's quality gate).

    exclude: gate failures left out; keep: synthesis order; fill: cases that passed first, failures only after
    them (used only by a mix that needs more cases than passed)."""
    from cohort.manifest import load_manifest, select

    df = select(load_manifest(pool_manifest), source="synthetic")
    failed = df["quality_gate"].fillna("pass") == "fail" if "quality_gate" in df.columns else df["case_id"].isna()
    ids, bad = df["case_id"].astype(str), set(df["case_id"][failed].astype(str))
    if gate_failures == "keep":
        return ids.tolist(), bad
    passing = ids[~failed.to_numpy()].tolist()
    return (passing if gate_failures == "exclude" else passing + ids[failed.to_numpy()].tolist()), bad


# ---------------------------------------------------------------------------------------------------------------
# distilled students (synth.distill): which generator samples how; the flows check this before any work

def student_steps(checkpoint: str | Path) -> int | None:
    """A distilled student's sampling steps from its card (synth.distill.student_steps_of), None for a generator
    that is no student; an unreadable or missing file is synth's InputError naming it."""
    from synth.distill import student_steps_of

    try:
        return student_steps_of(checkpoint)
    except InputError as e:
        if e.kind == "bad-checkpoint":  # readable, but no distillation card in its metadata
            return None
        raise


def distilled_steps(checkpoint: str | Path, steps: int, setting: str = "sampling_steps") -> int:
    """The steps sampler 'distilled' runs ``checkpoint`` with: the student's own (its card). ``steps`` may be synth's
    default (taken as "the student's own") or the student's; anything else is a ConfigError naming the file. A
    checkpoint that is no student: synth's InputError naming it (before any work when called first)."""
    from synth.distill import student_steps_of

    n = student_steps_of(checkpoint)
    if int(steps) not in (STEPS, n):
        raise ConfigError(f"{checkpoint} is a {n}-step distilled student: sampler {DISTILLED!r} samples it with its "
                          f"own {n} steps; leave {setting} out or set it to {n}, not {steps}")
    return n


def refuse_student_with_another_sampler(checkpoint: str | Path, sampler: str, setting: str = "sampler") -> None:
    """ConfigError naming ``checkpoint`` if it is a distilled student and ``sampler`` is not 'distilled': a student
    learnt one step per two of its teacher's DDIM eta-0 steps at its own timesteps, so any other chain (DDIM-25 eta 1)
    samples it off the path it was trained on."""
    n = student_steps(checkpoint)
    if n is not None and sampler != DISTILLED:
        raise ConfigError(f"{checkpoint} is a {n}-step distilled student (medddpm distill): sample it with "
                          f"{setting} {DISTILLED!r} (its own {n} steps), not {sampler!r}")


def check_generator_choice(params: StudyParams) -> None:
    """Before any work: a distilled student (synth.distill) is sampled only with sampler "distilled" at its own steps
    and is never fine-tuned. sampler "distilled" needs medddpm_checkpoint to be a student (StudyParams names the
    profile's shipped student when none is given, and refuses it where none ships; a shipped file is checked against
    its card here; a file that is no student: synth's InputError naming it); a student given as medddpm_checkpoint
    with another sampler, or as medddpm_init (the study would fine-tune it with the denoising loss, which undoes
    the distillation), is a ConfigError naming the file and saying what to do instead."""
    if params.medddpm_checkpoint:
        if is_shipped_file(params.medddpm_checkpoint):
            checked_shipped_file(Path(params.medddpm_checkpoint))  # the bytes its card names, or one error
        if params.sampler == DISTILLED:
            distilled_steps(params.medddpm_checkpoint, params.sampling_steps)
        else:
            refuse_student_with_another_sampler(params.medddpm_checkpoint, params.sampler)
    elif (params.medddpm_init not in ("shipped", "scratch") and Path(params.medddpm_init).exists()
          and student_steps(params.medddpm_init) is not None):  # a missing file: the generator stage names it
        raise ConfigError(f"{params.medddpm_init} is a distilled student: the study fine-tunes medddpm_init with the "
                          "denoising loss, which would undo its distillation. Use it as is (medddpm_checkpoint="
                          f"{params.medddpm_init}, sampler {DISTILLED!r}), or fine-tune its teacher (the card's "
                          "'teacher') in a study and distil that study's generator with `medddpm distill`")


def synthesis_steps(params: StudyParams) -> int:
    """The steps the study samples with: a distilled student's own (its card; check_generator_choice has checked
    sampling_steps), else sampling_steps."""
    if params.sampler == DISTILLED:
        return distilled_steps(params.medddpm_checkpoint, params.sampling_steps)
    return params.sampling_steps

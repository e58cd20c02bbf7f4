"""Source layouts a cohort can be imported from, and how their channels and labels map to ours.

Each layout turns a source folder into a list of CaseSource: where one case's modalities and label are, and
the lookup from the source's label values to ours (cohort.labels: 0 background, 1 NCR, 2 ED, 3 ET; the brain
label 4 is derived later). Layouts (docs/brats.md has a section on each):

- ``brats2021``: SRC/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz, labels 0/1/2/4 (4 = ET).
- ``brats2023``: SRC/<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz (BraTS 2023/2024: GLI, MEN, MET, SSA, PED),
  labels 0/1/2/3 (3 = ET).
- ``msd``: Medical Segmentation Decathlon Task01_BrainTumour: imagesTr/<case>.nii.gz 4-D images, labelsTr/, and a
  dataset.json whose "modality" and "labels" name the channels and label values.
- ``nnunet``: an nnU-Net v2 raw dataset: imagesTr/<case>_<XXXX>.nii.gz, labelsTr/, and a dataset.json with
  "channel_names", "labels" and "file_ending".

Channel and label names read from a dataset.json are recognised only when they are one of the well-known
spellings below (exact match after lower-casing and dropping spaces, '-' and '_'); anything else must be mapped
by the user (``channel_map`` / ``label_map``, the CLI's --channel-map / --label-map), and an unmapped name is
refused. A mapping that leaves NCR, ED or ET without a source label cannot express our regions and is refused.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from core.errors import InputError, ConfigError
from .labels import BACKGROUND, BRATS_TO_OURS, ED, ET, LABEL_NAMES, MODALITIES, NCR, TUMOUR_LABELS

LAYOUTS = ("brats2021", "brats2023", "msd", "nnunet")
DATASET_JSON = "dataset.json"

# BraTS 2023+ file suffix of each of our modalities
BRATS2023_SUFFIX = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
BRATS2023_TO_OURS = {0: BACKGROUND, 1: NCR, 2: ED, 3: ET}

_CHANNEL_SYNONYMS = {
    "t1": ("t1", "t1w", "t1n", "nativet1", "t1native", "t1pre"),
    "t1ce": ("t1ce", "t1c", "t1gd", "t1wce", "t1post", "t1contrast", "t1gad", "t1wgd"),
    "t2": ("t2", "t2w"),
    "flair": ("flair", "t2f", "t2flair", "t2wflair"),
}
_LABEL_SYNONYMS = {
    BACKGROUND: ("background", "bg"),
    NCR: ("ncr", "necrosis", "necrotic", "necroticcore", "ncrnet", "net", "netc", "nonenhancingtumor",
          "nonenhancingtumour", "nonenhancingtumorcore", "nonenhancingtumourcore", "necrotictumorcore"),
    ED: ("ed", "edema", "oedema", "peritumoraledema", "peritumoraloedema", "snfh",
         "surroundingnonenhancingflairhyperintensity"),
    ET: ("et", "enhancingtumor", "enhancingtumour", "enhancing"),
}


def _norm(name) -> str:
    return re.sub(r"[\s_\-]+", "", str(name).strip().lower())


_CHANNEL_BY_NAME = {s: m for m, names in _CHANNEL_SYNONYMS.items() for s in names}
_LABEL_BY_NAME = {s: v for v, names in _LABEL_SYNONYMS.items() for s in names}
_LABEL_BY_NAME.update({_norm(n): v for v, n in LABEL_NAMES.items() if v != 4})  # "NCR", "ED", "ET", "background"


@dataclass(frozen=True)
class CaseSource:
    """Where one source case lives. images: our modality -> 3-D file, or (4-D file, channel index).
    label_map: source label value -> our label (0..3); any other value in the label file is refused."""

    case_id: str
    images: dict
    label: Path
    label_map: dict
    layout: str

    @property
    def where(self) -> Path:
        """What an error about the whole case names: the case folder (BraTS) or the label file."""
        return self.label.parent if self.layout.startswith("brats") else self.label

    @property
    def files(self) -> list[Path]:
        return [Path(s[0] if isinstance(s, tuple) else s) for s in self.images.values()] + [self.label]


# --- user mappings ----------------------------------------------------------------------------------------------

def parse_mapping(text: str | dict | None, what: str) -> dict[str, str]:
    """A user mapping: "k=v,k=v" text, a JSON file holding an object, or a dict; keys and values as strings."""
    if text is None:
        return {}
    if isinstance(text, dict):
        return {str(k).strip(): str(v).strip() for k, v in text.items()}
    if text.strip().endswith(".json") and Path(text.strip()).is_file():
        path = Path(text.strip())
        try:
            obj = json.loads(path.read_text())
        except ValueError as e:
            raise InputError(path, f"{what} file is not valid JSON ({e})", kind="bad-mapping") from e
        if not isinstance(obj, dict):
            raise InputError(path, f"{what} file must hold one JSON object {{source: ours}}", kind="bad-mapping")
        return parse_mapping(obj, what)
    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in item:
            raise ConfigError(f"{what} entry {item!r} is not SOURCE=OURS (e.g. 0=t1,1=t1ce)", kind="bad-mapping")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _our_modality(value: str, what: str) -> str | None:
    v = _norm(value)
    if v in ("skip", "ignore", "none", "-", ""):
        return None
    if v not in _CHANNEL_BY_NAME and v not in MODALITIES:
        raise ConfigError(f"{what}: {value!r} is not one of our modalities {list(MODALITIES)} (or 'skip')",
                          kind="bad-mapping")
    return _CHANNEL_BY_NAME.get(v, v)


def _our_label(value: str, what: str) -> int:
    v = _norm(value)
    if v.isdigit() and int(v) in (BACKGROUND, *TUMOUR_LABELS):
        return int(v)
    if v in _LABEL_BY_NAME:
        return _LABEL_BY_NAME[v]
    raise ConfigError(f"{what}: {value!r} is not one of our labels background/NCR/ED/ET (or 0-3)",
                      kind="bad-mapping")


def _user_key(user: dict[str, str], value: int, name: str) -> str | None:
    """The key of a user's channel or label map that names a declared (value, name): the value or the exact name,
    else the name up to case and punctuation (_norm); None if the user did not map it."""
    key = next((k for k in (str(value), name) if k in user), None)
    return key if key is not None else next((k for k in user if _norm(k) == _norm(name)), None)


def resolve_channels(declared: dict[int, str], user: dict[str, str], modalities, where) -> dict[str, int]:
    """Our modality -> source channel index, from the declared channel names and the user's overrides
    (keyed by channel index or name). Refuses an unrecognised, unmapped channel and a missing modality."""
    ours: dict[str, int] = {}
    used_keys = set()
    for idx, name in sorted(declared.items()):
        key = _user_key(user, idx, name)
        if key is not None:
            used_keys.add(key)
            m = _our_modality(user[key], f"channel map {key}={user[key]}")
        elif _norm(name) in _CHANNEL_BY_NAME:
            m = _CHANNEL_BY_NAME[_norm(name)]
        else:
            raise InputError(where, f"channel {idx} ({name!r}) is not a modality we recognise; map it, e.g. "
                                     f"--channel-map {idx}=t1ce (ours: {', '.join(MODALITIES)}; or {idx}=skip)",
                              kind="unmapped-channel")
        if m is None:
            continue
        if m in ours:
            raise InputError(where, f"channels {ours[m]} and {idx} both map to {m}", kind="bad-mapping")
        ours[m] = idx
    unknown = sorted(set(user) - used_keys)
    if unknown:
        raise InputError(where, f"channel map names {unknown}, which are not channels here "
                                 f"(channels: {dict(sorted(declared.items()))})", kind="bad-mapping")
    missing = [m for m in modalities if m not in ours]
    if missing:
        raise InputError(where, f"no channel maps to {missing} (channels: {dict(sorted(declared.items()))}, "
                                 f"mapped: {ours})", kind="missing-modality")
    return {m: ours[m] for m in modalities}


def resolve_labels(declared: dict[int, str], user: dict[str, str], where) -> dict[int, int]:
    """Source label value -> ours, from the declared label names and the user's overrides (keyed by value or
    name). Refuses an unrecognised, unmapped label and a mapping that cannot express NCR, ED and ET."""
    out: dict[int, int] = {}
    used_keys = set()
    for value, name in sorted(declared.items()):
        key = _user_key(user, value, name)
        if key is not None:
            used_keys.add(key)
            out[value] = _our_label(user[key], f"label map {key}={user[key]}")
        elif _norm(name) in _LABEL_BY_NAME:
            out[value] = _LABEL_BY_NAME[_norm(name)]
        else:
            raise InputError(where, f"label {value} ({name!r}) is not a label we recognise; map it, e.g. "
                                     f"--label-map {value}=NCR (ours: background, NCR, ED, ET)",
                              kind="unmapped-label")
    unknown = sorted(set(user) - used_keys)
    if unknown:
        raise InputError(where, f"label map names {unknown}, which are not labels here "
                                 f"(labels: {dict(sorted(declared.items()))})", kind="bad-mapping")
    bad = [v for v in out if not 0 <= v <= 255]
    if bad:
        raise InputError(where, f"label values {bad} outside 0..255", kind="bad-mapping")
    lacking = [LABEL_NAMES[t] for t in TUMOUR_LABELS if t not in out.values()]
    if lacking:
        shown = {v: f"{declared[v]}->{LABEL_NAMES[o]}" for v, o in sorted(out.items())}
        raise InputError(where, f"the labels cannot express our regions: nothing maps to {lacking} "
                                 f"(labels: {shown}); give --label-map", kind="bad-mapping")
    return out


# --- layouts ----------------------------------------------------------------------------------------------------

def _case_dirs(src: Path) -> list[Path]:
    return sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_dataset_json(src: Path) -> dict:
    path = src / DATASET_JSON
    if not path.is_file():
        raise InputError(path, "missing dataset.json (it names the channels and labels)", kind="missing-file")
    try:
        meta = json.loads(path.read_text())
    except ValueError as e:
        raise InputError(path, f"not valid JSON ({e})", kind="bad-mapping") from e
    if not isinstance(meta, dict):
        raise InputError(path, "must hold a JSON object", kind="bad-mapping")
    return meta


def detect_layout(src: str | Path) -> str:
    """The layout of a source folder, from dataset.json's keys or the file names of its first case folder."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "source folder does not exist", kind="missing-file")
    if (src / DATASET_JSON).is_file():
        meta = _read_dataset_json(src)
        if "channel_names" in meta:
            return "nnunet"
        if "modality" in meta:
            return "msd"
        raise InputError(src / DATASET_JSON, "has neither 'channel_names' (nnU-Net v2) nor 'modality' (MSD)",
                          kind="unknown-layout")
    for case_dir in _case_dirs(src)[:20]:  # a stray folder first is fine: look at a few
        c = case_dir.name
        if (case_dir / f"{c}_seg.nii.gz").exists() or (case_dir / f"{c}_t1.nii.gz").exists():
            return "brats2021"
        if (case_dir / f"{c}-seg.nii.gz").exists() or (case_dir / f"{c}-t1n.nii.gz").exists():
            return "brats2023"
    raise InputError(src, f"cannot tell the layout (none of {', '.join(LAYOUTS)}): expected a dataset.json or "
                           "case folders with <case>_t1.nii.gz (BraTS 2021) or <case>-t1n.nii.gz (BraTS 2023+); "
                           "choose one with --layout", kind="unknown-layout")


def _user_label_map(user: dict[str, str], default: dict[int, int], where) -> dict[int, int]:
    if not user:
        return dict(default)
    try:
        declared = {int(k): k for k in user}
    except ValueError:
        raise InputError(where, f"label map keys must be the label values in the files, got {sorted(user)}",
                          kind="bad-mapping") from None
    declared.setdefault(BACKGROUND, "background")  # 0 is background unless the map says otherwise
    return resolve_labels(declared, user, where)


def _brats(src: Path, modalities, user_labels, *, sep: str, suffix: dict, default_labels, layout) -> list[CaseSource]:
    labels = _user_label_map(user_labels, default_labels, src)
    cases = []
    for d in _case_dirs(src):
        c = d.name
        cases.append(CaseSource(c, {m: d / f"{c}{sep}{suffix.get(m, m)}.nii.gz" for m in modalities},
                                d / f"{c}{sep}seg.nii.gz", labels, layout))
    return cases


def _inside(src: Path, rel, where) -> Path:
    """src/rel for a path named in dataset.json, refusing one that leaves the dataset folder (checked on the
    text, so a dataset whose imagesTr is a symbolic link to another disk still imports)."""
    norm = os.path.normpath(str(rel))
    if not isinstance(rel, str) or os.path.isabs(norm) or norm == ".." or norm.startswith(".." + os.sep):
        raise InputError(where, f"path {rel!r} leaves the dataset folder {src}", kind="path-escape")
    return src / norm


def _declared(mapping, where, what: str, *, value_first: bool) -> dict[int, str]:
    """dataset.json's {"0": "FLAIR"} (MSD, value first) or {"background": 0} (nnU-Net labels) as {int: name}."""
    if not isinstance(mapping, dict) or not mapping:
        raise InputError(where, f"has no {what!r} object", kind="bad-mapping")
    out = {}
    for k, v in mapping.items():
        value, name = (k, v) if value_first else (v, k)
        if isinstance(value, (list, tuple)):
            raise InputError(where, f"{what} {name!r} is a region ({value}); region-based datasets are not "
                                     "supported, map the label values with --label-map", kind="bad-mapping")
        try:
            out[int(value)] = str(name)
        except (TypeError, ValueError):
            raise InputError(where, f"{what} entry {k!r}: {v!r} has no integer value", kind="bad-mapping") from None
    return out


def _msd(src: Path, modalities, user_channels, user_labels) -> list[CaseSource]:
    where = src / DATASET_JSON
    meta = _read_dataset_json(src)
    channels = resolve_channels(_declared(meta.get("modality"), where, "modality", value_first=True),
                                user_channels, modalities, where)
    labels = resolve_labels(_declared(meta.get("labels"), where, "labels", value_first=True), user_labels, where)
    if isinstance(meta.get("training"), list) and meta["training"]:
        if not all(isinstance(e, dict) and "image" in e and "label" in e for e in meta["training"]):
            raise InputError(where, "every 'training' entry must have 'image' and 'label'", kind="bad-mapping")
        pairs = [(_inside(src, e["image"], where), _inside(src, e["label"], where)) for e in meta["training"]]
    else:
        pairs = [(p, src / "labelsTr" / p.name) for p in sorted((src / "imagesTr").glob("*.nii.gz"))]
    pairs = [(i, lab) for i, lab in pairs if not i.name.startswith(".")]  # macOS "._BRATS_001.nii.gz" companions
    return [CaseSource(i.name[: -len(".nii.gz")], {m: (i, c) for m, c in channels.items()}, lab, labels, "msd")
            for i, lab in pairs]


def _nnunet(src: Path, modalities, user_channels, user_labels) -> list[CaseSource]:
    where = src / DATASET_JSON
    meta = _read_dataset_json(src)
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in (".nii.gz", ".nii"):
        raise InputError(where, f"file_ending {ending!r}: only NIfTI (.nii.gz, .nii) datasets can be imported",
                          kind="unknown-layout")
    channels = resolve_channels(_declared(meta.get("channel_names"), where, "channel_names", value_first=True),
                                user_channels, modalities, where)
    labels_decl = meta.get("labels")
    region_based = isinstance(labels_decl, dict) and any(isinstance(v, (list, tuple)) for v in labels_decl.values())
    if user_labels and region_based:
        labels = _user_label_map(user_labels, {}, where)  # region-based: the user's map of file values decides
    else:
        labels = resolve_labels(_declared(labels_decl, where, "labels", value_first=False), user_labels, where)
    label_files = sorted(p for p in (src / "labelsTr").glob(f"*{ending}") if not p.name.startswith("."))
    cases = []
    for lab in label_files:
        case = lab.name[: -len(ending)]
        cases.append(CaseSource(case, {m: src / "imagesTr" / f"{case}_{c:04d}{ending}" for m, c in channels.items()},
                                lab, labels, "nnunet"))
    return cases


def list_cases(src: str | Path, layout: str = "auto", *, modalities=MODALITIES, channel_map=None,
               label_map=None) -> tuple[str, list[CaseSource]]:
    """(layout, the cases of ``src``); layout 'auto' detects it. Raises InputError for a folder-level problem
    (unknown layout, unmapped channel or label, labels that cannot express our regions, no cases)."""
    src = Path(src)
    if not src.is_dir():
        raise InputError(src, "source folder does not exist", kind="missing-file")
    if layout == "auto":
        layout = detect_layout(src)
    user_channels, user_labels = parse_mapping(channel_map, "channel map"), parse_mapping(label_map, "label map")
    if layout in ("brats2021", "brats2023") and user_channels:
        raise ConfigError(f"--channel-map does not apply to {layout} (its file names say the modality)",
                          kind="bad-argument")
    if layout == "brats2021":
        cases = _brats(src, modalities, user_labels, sep="_", suffix={}, default_labels=BRATS_TO_OURS,
                       layout=layout)
    elif layout == "brats2023":
        cases = _brats(src, modalities, user_labels, sep="-", suffix=BRATS2023_SUFFIX,
                       default_labels=BRATS2023_TO_OURS, layout=layout)
    elif layout == "msd":
        cases = _msd(src, modalities, user_channels, user_labels)
    elif layout == "nnunet":
        cases = _nnunet(src, modalities, user_channels, user_labels)
    else:
        raise ConfigError(f"unknown layout {layout!r}; known: auto, {', '.join(LAYOUTS)}", kind="bad-argument")
    if not cases:
        hint = {"brats2021": "SRC/<case>/<case>_t1.nii.gz ...", "brats2023": "SRC/<case>/<case>-t1n.nii.gz ...",
                "msd": "imagesTr/<case>.nii.gz", "nnunet": "labelsTr/<case>.nii.gz"}[layout]
        raise InputError(src, f"no cases found for layout {layout} (expected {hint})", kind="missing-file")
    return layout, cases


def default_cohort_name(src: Path, layout: str) -> str:
    """The manifest's cohort column when the user gives none."""
    if layout in ("brats2021", "brats2023"):
        return layout
    if layout == "msd":
        return "msd-task01"
    return Path(src).resolve().name.lower()

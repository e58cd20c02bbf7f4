"""CLI verbs of this package (registered by medddpm.cli): segment-train, segment-predict."""
from __future__ import annotations


def _add_cases(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--cases", nargs="+", metavar="ID", help="case ids from the manifest")
    g.add_argument("--split", choices=("train", "val", "test"), help="every image row of this split")


def register(subparsers) -> None:
    from core.device import DEVICE_HELP

    from .config import BACKENDS, NETWORKS, SEG_PROFILES

    p = subparsers.add_parser(
        "segment-train", help="train a tumour segmenter (MONAI SegResNet/DynUNet or nnU-Net v2) on manifest cases",
        description="Train a segmenter on real and/or synthetic manifest rows. Validation (early stopping, "
                    "nnU-Net's fold-0 split) uses real cases only: --val-cases, or the manifest's real val rows. "
                    "Target labels 0 background (incl. brain), 1 NCR, 2 ED, 3 ET. Rerunning resumes.")
    p.add_argument("--manifest", required=True, help="data_manifest.csv")
    _add_cases(p)
    p.add_argument("--val-cases", nargs="+", metavar="ID", help="real validation case ids (default: real val rows)")
    p.add_argument("--out", required=True, help="model directory to create (or resume)")
    p.add_argument("--backend", choices=BACKENDS, default="monai", help="default: monai")
    p.add_argument("--profile", choices=SEG_PROFILES, default="demo",
                   help="budget: tiny (tests), demo (CPU, about 2 minutes), paper (nnU-Net default budget)")
    p.add_argument("--network", choices=NETWORKS, default=None,
                   help="MONAI network (default: dynunet at demo, segresnet at tiny/paper; dynunet is nnU-Net-like and "
                        "learns the tumour core on the phantom where the small segresnet collapses it, at 2x the time "
                        "per step)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the profile's epochs (MONAI)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: leave torch's setting)")
    p.add_argument("--device", default="auto", help=f"where to train: {DEVICE_HELP} (default auto); nnU-Net on a "
                                                    "GPU keeps its torch.compile and augmentation workers")
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "segment-predict", help="predict tumour label maps (0..3) with a trained segmenter",
        description="Write <out>/<case_id>.nii.gz label maps (0 bg, 1 NCR, 2 ED, 3 ET) on each input's grid.")
    p.add_argument("--model", required=True, help="model directory written by segment-train")
    p.add_argument("--manifest", required=True, help="data_manifest.csv holding the cases")
    _add_cases(p)
    p.add_argument("--out", required=True, help="output folder for the label NIfTIs")
    p.add_argument("--device", default=None, help=f"where to predict: {DEVICE_HELP} (default: the model's setting)")
    p.set_defaults(func=_predict)


def _train(args) -> int:
    from .api import train
    from .config import SegmenterConfig

    cfg = SegmenterConfig(backend=args.backend, profile=args.profile, seed=args.seed, epochs=args.epochs,
                          val_ids=args.val_cases, num_threads=args.threads, device=args.device,
                          network=args.network if args.backend == "monai" else None)
    model_dir = train(args.manifest, args.cases or args.split, args.out, cfg)
    print(model_dir)
    return 0


def _predict(args) -> int:
    from .api import predict

    out = predict(args.model, args.manifest, args.cases or args.split, args.out, device=args.device)
    print(f"{len(out)} predictions in {args.out}")
    return 0

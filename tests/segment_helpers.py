"""Helpers shared by the segmenter tests (test_segment*.py): mean Dice, an untrained baseline, a mixed
real+synthetic manifest, an odd case."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cohort.manifest import append_rows, case_files, load_manifest, make_row
from cohort.nifti import read_array, read_label, write_array


def mean_dice(preds: dict[str, Path], manifest: Path) -> tuple[float, float]:
    """(mean Dice over the regions WT, TC, ET, mean whole-tumour Dice) of predictions against the manifest labels,
    by the study's own measure (eval.segmentation, BraTS rule for empty regions)."""
    from eval.segmentation import region_dice

    df = load_manifest(manifest).set_index("case_id", drop=False)
    per_case = np.array([region_dice(read_label(p)[0], read_label(case_files(manifest, df.loc[cid]).label)[0],
                                     ("WT", "TC", "ET")) for cid, p in preds.items()])
    return float(per_case.mean()), float(per_case[:, 0].mean())


def untrained_copy(model_dir: Path, dst: Path, seed: int = 0) -> Path:
    """A copy of a trained model directory whose weights are replaced by the network as freshly initialised
    (seeded): the baseline a trained segmenter must beat, predicted through the production api.predict."""
    import shutil

    import torch

    from segment.config import load_config

    cfg = load_config(model_dir)
    shutil.copytree(model_dir, dst)
    torch.manual_seed(seed)
    if cfg.backend == "monai":
        from segment import monai_backend

        network = monai_backend.build_network(cfg, len(cfg.modalities))
        monai_backend._save_safetensors(network, dst / "model.safetensors")
        return dst
    from segment import nnunet_backend

    # nnU-Net's own initialisation (InitWeights_He(1e-2)): He-normal convolutions, zero biases, unit norm scales
    path = nnunet_backend.final_checkpoint(dst, cfg.trainer)
    ckpt = nnunet_backend.load_checkpoint(path)
    for name, w in ckpt["network_weights"].items():
        if w.ndim >= 3:
            torch.nn.init.kaiming_normal_(w, a=1e-2)
        else:
            torch.nn.init.constant_(w, 0.0 if name.endswith("bias") else 1.0)
    torch.save(ckpt, path)
    return dst


def mixed_manifest(toy_manifest: Path, n_synthetic: int = 3) -> Path:
    """A manifest beside the toy cohort: its real rows, the odd-geometry case (odd_000) and synthetic rows
    (copies of real train cases' files), syn_000 deliberately marked split=val: it must never validate."""
    out = Path(toy_manifest).parent / f"mixed_{n_synthetic}_manifest.csv"
    if out.exists():
        return out
    odd = odd_geometry_manifest(toy_manifest)
    df = load_manifest(toy_manifest)
    rows = [r.dropna().to_dict() for _, r in df.iterrows()]
    for _, r in load_manifest(odd).iterrows():
        cf = case_files(odd, r)
        rows.append(make_row(out, case_id=r["case_id"], cohort="toy", source="real", split="test", images=cf.images,
                             label=cf.label, shape=r["shape"].split("x"), spacing=r["spacing"].split("x")))
    train = df[df["split"] == "train"]
    for i, (_, r) in enumerate(train.head(n_synthetic).iterrows()):
        cf = case_files(toy_manifest, r)
        rows.append(make_row(out, case_id=f"syn_{i:03d}", cohort="toy-synth", source="synthetic",
                             split="val" if i == 0 else "train", images=cf.images, label=cf.label,
                             shape=r["shape"].split("x"), spacing=r["spacing"].split("x"), parent_case_id=r["case_id"],
                             mask_edit="none", generator_checkpoint="test.safetensors", sampler="ddim", steps="10",
                             seed=str(i)))
    append_rows(out, rows)
    return out


def odd_geometry_manifest(toy_manifest: Path) -> Path:
    """One case with a shape that is not a multiple of the network's stride and an oblique affine."""
    out = Path(toy_manifest).parent / "odd" / "data_manifest.csv"
    if out.exists():
        return out
    df = load_manifest(toy_manifest)
    r = df[df["split"] == "test"].iloc[0]
    cf = case_files(toy_manifest, r)
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.array([[9 * c, -9 * s, 0, -70.0], [9 * s, 9 * c, 0, -95.0], [0, 0, 9, -60.0], [0, 0, 0, 1]])
    crop = (slice(0, 15), slice(1, 20), slice(0, 14))
    images = {m: write_array(out.parent / f"odd_{m}.nii.gz", read_array(p)[0][crop], affine)
              for m, p in cf.images.items()}
    label = write_array(out.parent / "odd_seg.nii.gz", read_label(cf.label)[0][crop], affine)
    append_rows(out, [make_row(out, case_id="odd_000", cohort="toy", source="real", split="test", images=images,
                               label=label, shape=(15, 19, 14), spacing=(9, 9, 9))])
    return out


def sha256_arrays(paths: dict[str, Path]) -> str:
    """Hash of the predicted label voxels (not the gzip bytes), in case-id order."""
    h = hashlib.sha256()
    for cid in sorted(paths):
        h.update(cid.encode())
        h.update(read_label(paths[cid])[0].tobytes())
    return h.hexdigest()

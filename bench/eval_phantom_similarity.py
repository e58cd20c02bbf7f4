"""Memorisation similarity scales on the phantom cohort (demo grid): what a copy, a mask-faithful sample and a
different patient score, the real test->train calibration, and real-image MS-SSIM diversity.

Run: .venv/bin/python -m bench.eval_phantom_similarity [OUT_DIR]   (builds a 16-case demo phantom cohort, ~1 min)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main(out: str = "/tmp/eval_phantom") -> None:
    from cohort.phantom import build_phantom_cohort
    from eval.memorisation import brain_correlation, copy_threshold, mask_rendering, similarity_matrix
    from eval.synthesis import diversity, mmd, read_cases

    man = build_phantom_cohort(Path(out) / "cohort", n_cases=16, seed=0, profile="demo")
    rows, tr_cases = read_cases(man, source="real", split="train", progress=False)
    _, te_cases = read_cases(man, source="real", split="test", progress=False)
    tr, trl = [c.image for c in tr_cases], [c.label_map for c in tr_cases]
    te, tel = [c.image for c in te_cases], [c.label_map for c in te_cases]
    cal = similarity_matrix([v.data for v in te], tel, [v.data for v in tr], trl, progress=False).max(1)
    print(f"{len(tr)} train, {len(te)} test; real test->train NN similarity {np.round(cal, 3).tolist()}, "
          f"threshold(max) {copy_threshold(cal):.3f}")
    rng = np.random.default_rng(0)
    for k in range(3):
        img, lab = tr[k].data, trl[k]
        brain = lab > 0
        sd = img[:, brain].std()
        rend = mask_rendering(lab, img, lab)
        faithful = rend + rng.normal(0, 0.3 * sd, img.shape)
        print(f"{rows.case_id[k]}: mask_similarity {brain_correlation(rend, img, brain):.3f}, "
              f"owner+10% noise {brain_correlation(img + rng.normal(0, 0.1 * sd, img.shape), img, brain):.3f}, "
              f"mask rendering+30% noise {brain_correlation(faithful, img, brain):.3f}, "
              f"other patient {brain_correlation(tr[k + 3].data, img, brain | (trl[k + 3] > 0)):.3f}")
    d = diversity([v.data for v in tr], None, max_pairs=30)["across"]
    print(f"real MS-SSIM across patients: mean {d.mean():.3f} sd {d.std():.3f} ({len(d)} pairs)")
    print(f"MMD real train vs real test: {mmd([v.data for v in tr], [v.data for v in te]):.5f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="/tmp/eval_phantom", metavar="OUT_DIR")
    main(ap.parse_args().out)

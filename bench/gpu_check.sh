#!/usr/bin/env bash
# The GPU check (one script, <= 8 min on one GPU): Med-DDPM at paper-brats 192x192x144 — seconds per
# training step and peak GiB for fp32, bf16, bf16 + activation checkpointing, + torch.compile; DDIM-25 per volume.
#
# On this project's machines (no GPU), first fetch the pure-Python wheels the GPU machine lacks (it has its own
# python3 with torch + CUDA, no MONAI), into the git-ignored folder .whl/:
#     python3 -m pip download --no-deps -d .whl monai==1.6.1 tqdm==4.70.1
# then run this script on the GPU machine from the repository root (with .whl/ carried along):
#     bash bench/gpu_check.sh            # prints the table; writes $OUT/gpu_check.json when OUT is set
# nnU-Net's epoch is not in this check: its dependencies (nnunetv2, batchgenerators, SimpleITK, ...) do not fit the
# 64 MiB that travels to the GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import monai" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "no MONAI and no .whl/ wheels: see the header of $0" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-check-site .whl/*.whl
  export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
PYTHONUNBUFFERED=1 timeout 470 python3 -m bench.gpu_check --device cuda "$@"

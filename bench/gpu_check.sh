#!/usr/bin/env bash
# The GPU check (one script, <= 8 min on one GPU): Med-DDPM at paper-brats 192x192x144 — seconds per
# training step and peak GiB for fp32, bf16, bf16 + activation checkpointing, + torch.compile; DDIM-25 per volume.
#
# The GPU machine needs only a python3 with torch and CUDA; it needs no network. In two steps:
# 1. On a machine with pip and the network (any OS), from the repository root:
#        bash bench/gpu_check.sh --fetch [PYTHON_VERSION]    # the GPU machine's python3 version, default 3.12
#    downloads the x86-64 Linux wheels of bench/gpu_check.requirements.txt (what bench/gpu_check.py imports beyond
#    torch) into the git-ignored folder .whl/ (~30 MB). PYTHON=... names the interpreter whose pip downloads.
# 2. On the GPU machine, from the repository root, with .whl/ carried along:
#        bash bench/gpu_check.sh [bench.gpu_check options]
#    installs from .whl/ (no index) those of the listed packages its python3 lacks, into /tmp/gpu-check-site, and
#    runs the check: each row is printed and written to $OUT/gpu_check.json (or --json PATH) as it finishes, with
#    the plan's predicted peak (plan_gib, synth.costs) beside the measured max_memory_allocated (peak_gib); a row
#    the plan says cannot fit is skipped with the reason, and the run stops at 440 s.
# nnU-Net's epoch is not in this check: its dependencies (nnunetv2, batchgenerators, SimpleITK, ...) do not fit the
# 64 MiB that travels to the GPU machine. On a GPU machine with the project's own environment (make), the
# full-size run of every stage is `.venv/bin/python -m bench.bench_fullsize --device cuda` (issue 31); its import,
# authors'-format import and Dice stages do not use the GPU, so their CPU rows in docs/benchmarks.md stand.
set -euo pipefail
cd "$(dirname "$0")/.."
REQUIREMENTS=bench/gpu_check.requirements.txt
if [[ "${1:-}" == "--fetch" ]]; then
  # pip matches each manylinux tag exactly: the tags these wheels are published under
  "${PYTHON:-python3}" -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "${2:-3.12}" --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl -r "$REQUIREMENTS"
  du -sh .whl
  exit 0
fi
# the listed packages this python3 lacks (one already there stays, whatever its version)
missing=$(python3 - "$REQUIREMENTS" <<'EOF'
import importlib.metadata as md
import sys

for line in open(sys.argv[1]):
    req = line.split("#")[0].strip()
    try:
        req and md.version(req.split("==")[0])
    except md.PackageNotFoundError:
        print(req)
EOF
)
if [[ -n "$missing" ]]; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "python3 lacks" $missing "and there is no .whl/: run 'bash $0 --fetch' on a" \
                                          "machine with the network first (see the header of $0)" >&2; exit 2; }
  echo "installing from .whl/:" $missing
  # shellcheck disable=SC2086  # one argument per requirement
  python3 -m pip install -q --no-index --find-links .whl --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu-check-site $missing
  export PYTHONPATH=/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'; print(torch.cuda.get_device_name(0))"
PYTHONUNBUFFERED=1 timeout 440 python3 -m bench.gpu_check --device cuda "$@"

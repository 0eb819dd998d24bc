#!/bin/sh
# The GPU check in one call (docs/gpu.md): about 9 minutes on one GPU.
#   benchmarks/gpu_check.sh OUT [iwae gpu-check options]     e.g. benchmarks/gpu_check.sh gpu-out
#   benchmarks/gpu_check.sh OUT --smoke                        toy sizes on the CPU (seconds)
# Writes OUT/gpu-check.json and OUT/gpu-check.md (the summary to commit to docs/gpu.md).
set -eu
if [ $# -lt 1 ]; then
    echo "usage: benchmarks/gpu_check.sh OUT [--smoke] [iwae gpu-check options]" >&2
    exit 2
fi
out=$1
shift
exec "${PYTHON:-python}" -m iwae gpu-check --out "$out" "$@"

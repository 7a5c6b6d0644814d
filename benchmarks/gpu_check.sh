#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu.py) in one command, for the single-GPU machine, which lacks
# pydantic and has no network: the wheels `python benchmarks/gpu.py --fetch-wheels` put into
# benchmarks/wheels (gitignored; carry it) are installed into a folder of their own first.
#   bash benchmarks/gpu_check.sh [gpu.py ARGS]     results: $OUT (or runs/gpu-check)/gpu_check.{json,md}
set -uo pipefail
cd "$(dirname "$0")/.."
site=${FTPIPE_GPU_SITE:-/tmp/ftpipe-gpu-site}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G "benchmarks/wheels/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        benchmarks/wheels/*.whl || { echo "gpu_check: installing benchmarks/wheels failed" >&2; exit 3; }
    export PYTHONPATH="$PYTHONPATH:$site"
fi
python3 -c "import pydantic, yaml, psutil" || {
    echo "gpu_check: pydantic is missing; run 'python benchmarks/gpu.py --fetch-wheels' and carry benchmarks/wheels" >&2
    exit 3
}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null
# 8 minutes in all: gpu.py stops starting runs after --budget seconds; this is the hard stop. The whole
# output (the stages' and the child processes' too) is kept beside the report.
out=${OUT:-runs/gpu-check}
mkdir -p "$out"
timeout --signal=INT --kill-after=20 470 python3 benchmarks/gpu.py "$@" 2>&1 | tee "$out/gpu_check.log"

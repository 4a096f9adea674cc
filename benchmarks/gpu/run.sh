#!/usr/bin/env bash
# The GPU check, one script, < 8 minutes on an H100 (Python 3.12, torch 2.11, triton 3.6, no network):
# build the CUDA extension, run every GPU and Triton test (bf16/fp16/fp32), benchmark every op and
# write the pytest-benchmark JSON, a Markdown table and a PNG, named by device and date, to $OUT (if
# set) and benchmarks/results/.  Usage: benchmarks/gpu/run.sh [extra pytest args for the benchmarks]
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
RESULTS=benchmarks/results
OUT_DIR=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$OUT_DIR"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="$OUT_DIR/gpu_run_$stamp.log"
exec > >(tee -a "$log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (CUDA extension for sm_90) =="
time GDRD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 \
    "$PYTHON" -m pip install -e . --no-build-isolation --no-deps -q
"$PYTHON" -m gdrd_fast env

echo "== GPU and Triton tests =="
# the static sm_90/sm_80 compile checks need no GPU and run in CI; here they would only cost minutes
status=0
time "$PYTHON" -m pytest tests -m "cuda or triton" --ignore=tests/test_triton_static.py -q -p no:cacheprovider -ra \
    || status=$?

echo "== benchmarks =="
json=$(mktemp --suffix=.json)  # report.py files it under a device-and-date name
time "$PYTHON" -m pytest benchmarks --benchmark-only --benchmark-json="$json" -q -p no:cacheprovider "$@" || status=$?
if [ -s "$json" ]; then
    "$PYTHON" -m benchmarks.report "$json" --out "$RESULTS" --out "$OUT_DIR"
fi
exit $status

#!/usr/bin/env bash
# The GPU check, one script, < 8 minutes on an H100 (Python 3.12, torch 2.11, triton 3.6, no network):
# build the CUDA extension, run every GPU test (CUDA and Triton kernels, bf16/fp16/fp32), benchmark every op and
# write the pytest-benchmark JSON, a Markdown table and a PNG, named by device and date, to $OUT (if
# set) and benchmarks/results/.  Usage: benchmarks/gpu/run.sh [extra pytest args for the benchmarks]
#
# Each phase runs against one deadline (GDRD_GPU_BUDGET_S, default 450 s from the start): the tests,
# then the benchmarks without torch.compile providers, then the compile providers (their compile time is
# the unknown). A phase cut short by the deadline is interrupted (SIGINT), so it still reports and
# writes what it measured; the report merges both benchmark passes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
RESULTS=benchmarks/results
OUT_DIR=${OUT:-$RESULTS}
BUDGET=${GDRD_GPU_BUDGET_S:-450}
mkdir -p "$RESULTS" "$OUT_DIR"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="$OUT_DIR/gpu_run_$stamp.log"
exec > >(tee -a "$log") 2>&1

# seconds left before the deadline, minus a reserve for what still follows
left() { echo $((BUDGET - SECONDS - $1)); }
# run a phase until the deadline (SIGINT, then SIGKILL 20 s later); a non-zero status is remembered
status=0
phase() {
    local seconds=$1; shift
    if [ "$seconds" -le 10 ]; then
        echo "skipped (deadline): $*"
        status=1
        return
    fi
    echo "(up to $seconds s)"
    time timeout -s INT -k 20 "$seconds" "$@" || status=$?
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

if compgen -G ".whl/*.whl" > /dev/null; then  # `make gpu-wheels` here, then carry .whl/ (no network there)
    echo "== carried wheels =="
    # --target: a side folder, so an externally managed system Python accepts it too
    if "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target .whl/site .whl/*.whl; then
        export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "the carried wheels did not install: tests and benchmarks that need them will not run"
    fi
fi

echo "== build (CUDA extension for sm_90) =="
export GDRD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16
start=$SECONDS
if ! "$PYTHON" -m pip install -e . --no-build-isolation --no-deps -q; then
    echo "pip install -e failed: building in place instead"
    "$PYTHON" setup.py -q build_ext --inplace
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "build: $((SECONDS - start)) s"
"$PYTHON" -m gdrd_fast env

echo "== GPU tests (CUDA kernels, Triton kernels, models) =="
# -m cuda: every test that needs the GPU. The Triton interpreter runs and the static sm_90/sm_80 compile
# checks need none and run in CI. A module whose imports are missing here must not stop the others.
phase "$(left 150)" "$PYTHON" -m pytest tests -m cuda -q \
    -p no:cacheprovider -ra --continue-on-collection-errors --durations=15

echo "== benchmarks: gdrd_fast, eager and peers =="
core=$(mktemp --suffix=.json)
compiled=$(mktemp --suffix=.json)
rm -f "$core" "$compiled"  # report.py takes only the files a pass wrote
phase "$(left 40)" "$PYTHON" -m pytest benchmarks --benchmark-only --benchmark-json="$core" -q -p no:cacheprovider \
    --continue-on-collection-errors --durations=10 -k "not compile" "$@"

echo "== benchmarks: torch.compile providers =="
phase "$(left 10)" "$PYTHON" -m pytest benchmarks --benchmark-only --benchmark-json="$compiled" -q \
    -p no:cacheprovider --continue-on-collection-errors --durations=10 -k "compile" "$@"

written=()
for f in "$core" "$compiled"; do [ -s "$f" ] && written+=("$f"); done
if [ ${#written[@]} -gt 0 ]; then
    "$PYTHON" -m benchmarks.report "${written[@]}" --out "$RESULTS" --out "$OUT_DIR"
fi
echo "total: $SECONDS s (budget $BUDGET s), status $status"
exit $status

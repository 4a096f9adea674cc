#!/usr/bin/env bash
# The GPU check, one script, < 8 minutes on an H100 (Python 3.12, torch 2.11, triton 3.6, no network):
#   1. the CUDA extension for sm_90: a carried prebuilt one (`make gpu-prebuilt`, built from the same sources
#      for this Python and torch) or built here with 16 jobs;
#   2. correctness first: every GPU test (each CUDA and Triton kernel against the float64 reference in fp32,
#      fp16 and bf16), summarised by benchmarks/gpu/verdict.py into <device>_<date>_correctness.{md,json};
#   3. the benchmarks of gdrd_fast, eager and peers, then the torch.compile providers; their results
#      (pytest-benchmark JSON, Markdown table, PNG, named by device and date, with the verdict inside) go to
#      $OUT (if set) and benchmarks/results/.
# Usage: benchmarks/gpu/run.sh [extra pytest args for the benchmarks]
#
# Every phase logs its predicted time and runs against one deadline (GDRD_GPU_BUDGET_S, default 420 s from
# the start, build included; with at most 20 s to stop a phase and 30 s for the report: under 8 minutes).
# A phase cut short by the deadline is interrupted (SIGINT), so it still reports and writes what it measured.
# Exit status 0 only if the verdict is PASS and every phase completed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
RESULTS=benchmarks/results
OUT_DIR=${OUT:-$RESULTS}
BUDGET=${GDRD_GPU_BUDGET_S:-420}
BENCH=${GDRD_GPU_BENCH:-benchmarks}  # the benchmark files: all of them (a dry run on CPU narrows this)
# predicted seconds per phase on one H100 with 16 cores; estimates until a GPU run replaces them with the
# durations its log reports. Their sum with a fresh build is 410 s; with a carried build 290 s.
PREDICT_BUILD=120 PREDICT_TESTS=140 PREDICT_BENCH=100 PREDICT_COMPILE=40 PREDICT_REPORT=10
mkdir -p "$RESULTS" "$OUT_DIR"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="$OUT_DIR/gpu_run_$stamp.log"
build_log="$OUT_DIR/gpu_build_$stamp.log"

# seconds left before the deadline, minus a reserve for what still follows
left() { echo $((BUDGET - SECONDS - $1)); }
status=0
# phase NAME PREDICTED SECONDS CMD...: run until the deadline (SIGINT, then SIGKILL 20 s later)
phase() {
    local name=$1 predicted=$2 seconds=$3 start=$SECONDS rc=0
    shift 3
    echo "== $name: predicted $predicted s, deadline in $seconds s =="
    if [ "$seconds" -le 10 ]; then
        echo "== $name: skipped (deadline)"
        status=1
        return
    fi
    timeout -s INT -k 20 "$seconds" "$@" || rc=$?
    [ $rc -eq 0 ] || status=1
    echo "== $name: took $((SECONDS - start)) s (predicted $predicted s), exit $rc"
}

# --- setup, logged apart so that the run log opens with the stack and its kernels --------------------------
{
    if compgen -G ".whl/*.whl" > /dev/null; then  # `make gpu-wheels` here, then carry .whl/ (no network there)
        # --target: a side folder, so an externally managed system Python accepts it too
        "$PYTHON" -m pip install -q --no-index --no-deps --upgrade --target .whl/site .whl/*.whl \
            || echo "the carried wheels did not install: tests and benchmarks that need them will not run"
    fi
} > "$build_log" 2>&1
[ -d .whl/site ] && export PYTHONPATH="$PWD/.whl/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GDRD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16}

# A carried build is used when its record names this torch for both extensions and these sources.
prebuilt=$("$PYTHON" - <<'EOF' 2>>"$build_log" || true
import json, runpy, sysconfig, torch
with open(f"gdrd_fast/_build.{sysconfig.get_config_var('SOABI')}.json") as f:
    record = json.load(f)
built = f"built against torch {torch.__version__}"
if (record.get("gdrd_fast._C") == built and record.get("gdrd_fast._C_cuda") == built
        and record.get("sources") == runpy.run_path("setup.py")["sources_digest"]()):
    print("carried")
EOF
)
build_start=$SECONDS
if [ "$prebuilt" = carried ] && [ "${GDRD_FORCE_BUILD:-0}" != 1 ]; then
    build="carried prebuilt (make gpu-prebuilt), not rebuilt"
else
    echo "building the CUDA extension for sm_90 with $MAX_JOBS jobs: predicted $PREDICT_BUILD s, log $build_log"
    if timeout 300 "$PYTHON" setup.py build_ext --inplace >> "$build_log" 2>&1; then
        build="built here in $((SECONDS - build_start)) s (predicted $PREDICT_BUILD s)"
    else
        build="BUILD FAILED after $((SECONDS - build_start)) s (predicted $PREDICT_BUILD s): see $build_log"
        status=1
        tail -n 30 "$build_log"
    fi
fi

exec > >(tee -a "$log") 2>&1
echo "gdrd_fast GPU run $stamp, deadline $BUDGET s"
"$PYTHON" - "$build" <<'EOF' || status=1
import platform, subprocess, sys
import torch
from gdrd_fast import backends
from gdrd_fast.env import why_missing
gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                     capture_output=True, text=True).stdout.strip() or "nvidia-smi gave nothing"
print(f"stack: Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {backends.triton_version()}, GPU {gpu}")
cpu, cuda = backends.cpu_extension(), backends.cuda_extension()
print(f"kernels: C++ CPU gdrd_fast._C {'loaded' if cpu else 'MISSING (' + why_missing('gdrd_fast._C') + ')'}; "
      f"CUDA gdrd_fast._C_cuda " + (f"for arch {cuda.ARCH_LIST}, CUDA {cuda.CUDA_VERSION}" if cuda else
                                    f"MISSING ({why_missing('gdrd_fast._C_cuda')})")
      + f", {sys.argv[1]}; Triton kernels JIT-compiled by triton {backends.triton_version()} at first call")
sys.exit(0 if cpu and cuda else 1)
EOF
total=$((PREDICT_TESTS + PREDICT_BENCH + PREDICT_COMPILE + PREDICT_REPORT))
echo "predicted: build $PREDICT_BUILD s if not carried, tests $PREDICT_TESTS s, benchmarks $PREDICT_BENCH s," \
     "compile providers $PREDICT_COMPILE s, report $PREDICT_REPORT s: $total s after the build"

# -m cuda: every test that needs the GPU. The Triton interpreter runs and the static sm_90/sm_80 compile
# checks need none and run in CI. A module whose imports are missing here must not stop the others.
outcomes=$(mktemp --suffix=.json)
phase "correctness (GPU tests)" "$PREDICT_TESTS" "$(left $((PREDICT_BENCH + PREDICT_COMPILE)))" \
    env GDRD_GPU_OUTCOMES="$outcomes" "$PYTHON" -m pytest tests -m cuda -q -p no:cacheprovider -ra \
    --continue-on-collection-errors --durations=15
verdict=$(mktemp --suffix=.json)
if "$PYTHON" -m benchmarks.gpu.verdict "$outcomes" --out "$RESULTS" --out "$OUT_DIR"; then :; else status=1; fi
cp "$(ls -t "$OUT_DIR"/*_correctness.json | head -n 1)" "$verdict"
export GDRD_GPU_VERDICT="$verdict"  # benchmarks/conftest.py writes it into the benchmark JSON

core=$(mktemp --suffix=.json)
compiled=$(mktemp --suffix=.json)
rm -f "$core" "$compiled"  # report.py takes only the files a pass wrote
phase "benchmarks: gdrd_fast, eager and peers" "$PREDICT_BENCH" "$(left $((PREDICT_COMPILE / 2)))" \
    "$PYTHON" -m pytest $BENCH --benchmark-only --benchmark-json="$core" -q -p no:cacheprovider \
    --continue-on-collection-errors --durations=10 -k "not compile" "$@"
phase "benchmarks: torch.compile providers" "$PREDICT_COMPILE" "$(left "$PREDICT_REPORT")" \
    "$PYTHON" -m pytest $BENCH --benchmark-only --benchmark-json="$compiled" -q \
    -p no:cacheprovider --continue-on-collection-errors --durations=10 -k "compile" "$@"

written=()
for f in "$core" "$compiled"; do [ -s "$f" ] && written+=("$f"); done
if [ ${#written[@]} -gt 0 ]; then
    # the report runs even past the deadline (up to 30 s): it writes what the benchmarks measured
    phase "report" "$PREDICT_REPORT" $(($(left 0) > 30 ? $(left 0) : 30)) "$PYTHON" -m benchmarks.report "${written[@]}" --out "$RESULTS" --out "$OUT_DIR"
else
    echo "== report: no benchmark wrote results"
    status=1
fi
echo "total: $SECONDS s (budget $BUDGET s), status $status"
exit $status

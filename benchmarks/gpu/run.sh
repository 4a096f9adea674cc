#!/usr/bin/env bash
# The GPU check, one script, < 8 minutes on an H100 (Python 3.12, torch 2.11, triton 3.6, no network):
#   1. the CUDA extension for sm_90: a carried prebuilt one (`make gpu-prebuilt`, built from the same sources
#      for this Python and torch) or built here with 16 jobs;
#   2. the Triton warm-up: every shipped Triton configuration compiled for this GPU by one process per core
#      into one Triton cache (benchmarks/gpu/warmup.py), so that the tests find their kernels compiled;
#   3. correctness first: every GPU test (each CUDA and Triton kernel against the float64 reference in fp32,
#      fp16 and bf16), summarised by benchmarks/gpu/verdict.py into <device>_<date>_correctness.{md,json};
#   4. the benchmarks of gdrd_fast, eager and peers (one pytest per file), then the torch.compile providers;
#      their results (pytest-benchmark JSON, Markdown table, PNG, named by device and date, with the verdict
#      inside) go to $OUT (if set) and benchmarks/results/.
# Usage: benchmarks/gpu/run.sh [extra pytest args for the benchmarks]
#
# Whatever a kernel does, the script goes on and reports: no phase stops a later one. Every raw file (the
# test outcomes, written as each test reports; each pytest-benchmark JSON; the logs) is written under $OUT.
# A test that hangs is stopped after GDRD_GPU_TEST_TIMEOUT_S (pytest-timeout, named in the log); after a
# crash or a hang the GPU tests resume past the test that caused it. Every phase logs its predicted and
# measured seconds and runs against one deadline (GDRD_GPU_BUDGET_S, default 420 s from the start, build
# included; with at most 20 s to stop a phase and 30 s for the report: under 8 minutes). A phase cut short by
# the deadline is interrupted (SIGINT), so it still reports and writes what it measured.
# Exit status 0 only if the verdict is PASS and every phase completed.
set -uo pipefail  # no -e: whatever fails, the later phases and the report still run
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
RESULTS=benchmarks/results
OUT_DIR=${OUT:-$RESULTS}
mkdir -p "$RESULTS" "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
BUDGET=${GDRD_GPU_BUDGET_S:-420}
TEST_TIMEOUT=${GDRD_GPU_TEST_TIMEOUT_S:-90}
BENCH_TIMEOUT=${GDRD_GPU_BENCH_TIMEOUT_S:-180}  # a benchmark compiles its providers (torch.compile) first
BENCH=${GDRD_GPU_BENCH:-benchmarks}  # the benchmark files or folders: all of them (a dry run narrows this)
JOBS=${MAX_JOBS:-$(nproc)}
# one Triton cache for the warm-up's processes and the tests (the HOME default too, but HOME may be bare)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
# predicted seconds per phase on one H100 with 16 cores; estimates until a GPU run replaces them with the
# durations its log reports. Their sum with a fresh build is 420 s; with a carried build 300 s. The warm-up's
# is its rehearsal's measured compile seconds over 16 processes (README).
PREDICT_BUILD=120 PREDICT_WARMUP=20 PREDICT_TESTS=140 PREDICT_BENCH=90 PREDICT_COMPILE=40 PREDICT_REPORT=10
stamp=$(date -u +%Y%m%dT%H%M%SZ)
log="$OUT_DIR/gpu_run_$stamp.log"
build_log="$OUT_DIR/gpu_build_$stamp.log"
outcomes="$OUT_DIR/gpu_outcomes_$stamp.jsonl"
verdict_json="$OUT_DIR/gpu_verdict_$stamp.json"

# seconds left before the deadline, minus a reserve for what still follows
left() { echo $((BUDGET - SECONDS - $1)); }
status=0
timings=()
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
    [ $rc -eq 0 ] || [ $rc -eq 5 ] || status=1  # 5: pytest selected nothing here
    echo "== $name: took $((SECONDS - start)) s (predicted $predicted s), exit $rc"
}
# timed NAME CMD...: a phase's seconds, kept for the summary line
timed() {
    local name=$1 start=$SECONDS
    shift
    "$@"
    timings+=("$name $((SECONDS - start)) s")
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
export GDRD_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$JOBS

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
timings+=("build $((SECONDS - build_start)) s")

exec > >(tee -a "$log") 2>&1
echo "gdrd_fast GPU run $stamp, deadline $BUDGET s, results in $OUT_DIR"
"$PYTHON" - "$build" <<'EOF' || status=1
import platform, subprocess, sys
import torch
from gdrd_fast import backends
from gdrd_fast.env import why_missing
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip() or "nvidia-smi gave nothing"
except OSError as error:
    gpu = f"no nvidia-smi ({error})"
print(f"stack: Python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {backends.triton_version()}, GPU {gpu}")
cpu, cuda = backends.cpu_extension(), backends.cuda_extension()
print(f"kernels: C++ CPU gdrd_fast._C {'loaded' if cpu else 'MISSING (' + why_missing('gdrd_fast._C') + ')'}; "
      f"CUDA gdrd_fast._C_cuda " + (f"for arch {cuda.ARCH_LIST}, CUDA {cuda.CUDA_VERSION}" if cuda else
                                    f"MISSING ({why_missing('gdrd_fast._C_cuda')})")
      + f", {sys.argv[1]}; Triton kernels JIT-compiled by triton {backends.triton_version()}")
sys.exit(0 if cpu and cuda else 1)
EOF
"$PYTHON" -m pip list > "$OUT_DIR/gpu_pip_list_$stamp.txt" 2>&1 || true  # the pytest version, among others
total=$((PREDICT_WARMUP + PREDICT_TESTS + PREDICT_BENCH + PREDICT_COMPILE + PREDICT_REPORT))
echo "predicted: build $PREDICT_BUILD s if not carried, Triton warm-up $PREDICT_WARMUP s, tests $PREDICT_TESTS s," \
     "benchmarks $PREDICT_BENCH s, compile providers $PREDICT_COMPILE s, report $PREDICT_REPORT s:" \
     "$total s after the build"

# pytest-timeout bounds each test (thread method: a kernel hung inside CUDA never returns to Python, so the
# process is ended, with the hung test and every thread's stack in the log; the tests then resume)
per_test=() per_bench=()
if "$PYTHON" -c "import pytest_timeout" 2> /dev/null; then
    per_test=(--timeout="$TEST_TIMEOUT" --timeout-method=thread)
    per_bench=(--timeout="$BENCH_TIMEOUT" --timeout-method=thread)
else
    echo "pytest-timeout is not installed: a hung test stops only at its phase's deadline"
fi

cache_entries() { find "$TRITON_CACHE_DIR" -name '*.json' ! -name '__grp__*' 2> /dev/null | wc -l; }
warmup() {
    phase "Triton warm-up ($JOBS processes, cache $TRITON_CACHE_DIR)" "$PREDICT_WARMUP" \
        "$(left $((PREDICT_TESTS + PREDICT_BENCH + PREDICT_COMPILE)))" \
        "$PYTHON" -m benchmarks.gpu.warmup --jobs "$JOBS" --report "$OUT_DIR/gpu_warmup_$stamp.json"
}
timed "Triton warm-up" warmup
warm_entries=$(cache_entries)

# -m cuda: every test that needs the GPU. The Triton interpreter runs and the static sm_90/sm_80 compile
# checks need none and run in CI. A module whose imports are missing here must not stop the others. After a
# session that did not finish (a crash, or a hang that pytest-timeout ended), the next one resumes past every
# test already started (tests/conftest.py, GDRD_GPU_RESUME), at most 4 sessions, within the deadline.
finished_sessions() { local n; n=$(grep -c '"event": "finished"' "$outcomes" 2> /dev/null); echo "${n:-0}"; }
gpu_tests() {
    local attempt resume=0 before
    for attempt in 1 2 3 4; do
        before=$(finished_sessions)
        GDRD_GPU_RESUME=$resume phase "correctness (GPU tests), session $attempt" \
            "$PREDICT_TESTS" "$(left $((PREDICT_BENCH + PREDICT_COMPILE)))" \
            "$PYTHON" -m pytest tests -m cuda -q -p no:cacheprovider -ra --continue-on-collection-errors \
            --durations=15 "${per_test[@]}"
        [ "$(finished_sessions)" -gt "$before" ] && return
        echo "== the GPU tests stopped in: $(grep '"event": "start"' "$outcomes" 2> /dev/null | tail -n 1)"
        status=1
        resume=1
    done
}
export GDRD_GPU_OUTCOMES="$outcomes"
timed "tests" gpu_tests
unset GDRD_GPU_OUTCOMES
echo "Triton cache: $warm_entries kernels after the warm-up, $(($(cache_entries) - warm_entries)) compiled" \
     "by the tests (not warmed up)"
"$PYTHON" -m benchmarks.gpu.verdict "$outcomes" --out "$RESULTS" --out "$OUT_DIR" --json-copy "$verdict_json" \
    || status=1
[ -s "$verdict_json" ] && export GDRD_GPU_VERDICT="$verdict_json"  # benchmarks/conftest.py writes it into the JSON

# one pytest per benchmark file: a crash loses that file's results only
mapfile -t bench_files < <(find $BENCH -name 'test_bench_*.py' 2> /dev/null | sort)
written=()
bench_pass() {
    local kind=$1 predicted=$2 reserve=$3 selection=$4 file json i=0 files
    shift 4
    files=("${bench_files[@]}")
    [ "$kind" = compile ] && mapfile -t files < <(grep -l compile "${bench_files[@]}" /dev/null)
    for file in "${files[@]}"; do
        json="$OUT_DIR/gpu_bench_${stamp}_$(basename "$file" .py)_$kind.json"
        i=$((i + 1))
        # each file gets an equal share of what is left
        phase "benchmarks ($kind): $file" "$((predicted / ${#files[@]}))" \
            "$(($(left "$reserve") / (${#files[@]} - i + 1)))" \
            "$PYTHON" -m pytest "$file" --benchmark-only --benchmark-json="$json" -q -ra -p no:cacheprovider \
            --durations=5 -k "$selection" "${per_bench[@]}" "$@"
        [ -s "$json" ] && written+=("$json")
    done
}
timed "benchmarks" bench_pass core "$PREDICT_BENCH" $((PREDICT_COMPILE + PREDICT_REPORT)) "not compile" "$@"
timed "compile providers" bench_pass compile "$PREDICT_COMPILE" "$PREDICT_REPORT" "compile" "$@"

report() {
    if [ ${#written[@]} -gt 0 ]; then
        # the report runs even past the deadline (up to 30 s): it writes what the benchmarks measured
        phase "report" "$PREDICT_REPORT" $(($(left 0) > 30 ? $(left 0) : 30)) \
            "$PYTHON" -m benchmarks.report "${written[@]}" --out "$RESULTS" --out "$OUT_DIR"
    else
        echo "== report: no benchmark wrote results"
        status=1
    fi
}
timed "report" report
echo "seconds: ${timings[*]}; total $SECONDS s (budget $BUDGET s), status $status"
exit $status

#!/usr/bin/env bash
# The GPU run rehearsed on a CPU replica of the GPU machine, as its one device call will run it
# (docs/performance/measuring.md): `make gpu-rehearsal`, in CI too.
#   1. here, with network: the documented preparation, `make gpu-wheels` and `make gpu-prebuilt` (skipped
#      when the Python 3.12 extension in the tree is already built from these sources for this torch);
#   2. a copy of the tracked tree plus the carried paths, as the device call carries them;
#   3. benchmarks/gpu/run.sh in that copy with the replica's python3 (`make gpu-replica`: Python 3.12 and
#      the GPU machine's packages), no network (`unshare -n` where allowed, else a proxy that refuses), no
#      package index, a bare HOME and a stub nvidia-smi: once as it is, once with a crash and a hang
#      injected in the GPU tests (tests/conftest.py, GDRD_GPU_INJECT);
#   4. each time: $OUT must hold the logs, the test outcomes, a correctness verdict (INCOMPLETE here: no GPU
#      test runs without a GPU) and the benchmark files.
# Usage: benchmarks/gpu/rehearse.sh [WORK_DIR]   (GPU_PYTHON: the replica's python, default .ci/venvs/gpu)
set -euo pipefail
WORK=$(mkdir -p "${1:-.ci/rehearsal}" && cd "${1:-.ci/rehearsal}" && pwd)  # absolute before the cd
GPU_PYTHON=$(realpath -s "${GPU_PYTHON:-.ci/venvs/gpu/bin/python}")
cd "$(dirname "$0")/../.."
ROOT=$PWD
# what the device call carries beside the tracked tree (docs/performance/measuring.md)
SOABI=$("$GPU_PYTHON" -c "import sysconfig; print(sysconfig.get_config_var('SOABI'))")
CARRY=(.whl "gdrd_fast/_C.$SOABI.so" "gdrd_fast/_C_cuda.$SOABI.so" "gdrd_fast/_build.$SOABI.json")
# the benchmarks on CPU: two cases of one file (the GPU run takes them all)
BENCH_FILE=benchmarks/test_bench_queue.py BENCH_CASES="push and (eager or cpu)"

step() { echo "== rehearsal: $* ($SECONDS s)"; }

step "preparation: make gpu-wheels, make gpu-prebuilt"
make -s gpu-wheels VENV="$(dirname "$(dirname "$GPU_PYTHON")")"
current=$("$GPU_PYTHON" - <<'EOF'
import json, runpy, sysconfig, torch
try:
    with open(f"gdrd_fast/_build.{sysconfig.get_config_var('SOABI')}.json") as f:
        record = json.load(f)
except OSError:
    record = {}
built = f"built against torch {torch.__version__}"
print(record.get("gdrd_fast._C") == built and record.get("gdrd_fast._C_cuda") == built
      and record.get("sources") == runpy.run_path("setup.py")["sources_digest"]())
EOF
)
if [ "$current" = True ]; then
    echo "the Python 3.12 extensions in the tree are built from these sources for this torch: carried as they are"
else
    make gpu-prebuilt GPU_PYTHON="$GPU_PYTHON"
fi
for path in "${CARRY[@]}"; do
    [ -e "$path" ] || { echo "rehearsal: the carried path $path is missing"; exit 1; }
done
echo "carried: ${CARRY[*]} ($(du -sch "${CARRY[@]}" | tail -n 1 | cut -f1))"

# a stub nvidia-smi: the run's log names the GPU it reports
mkdir -p "$WORK/bin"
cat > "$WORK/bin/nvidia-smi" <<'EOF'
#!/bin/sh
echo "NVIDIA H100 80GB HBM3 (stub of the CPU rehearsal), 0.0, 81559 MiB"
EOF
chmod +x "$WORK/bin/nvidia-smi"

if unshare -n true 2> /dev/null; then
    offline=(unshare -n)
else  # no network namespace here: every proxy refuses, and pip has no index
    offline=(env http_proxy=http://127.0.0.1:9 https_proxy=http://127.0.0.1:9 all_proxy=http://127.0.0.1:9)
fi

# rehearse NAME [VAR=VALUE...]: run.sh in a fresh copy, offline, with a bare HOME; then check its $OUT
rehearse() {
    local name=$1 tree="$WORK/$1/tree" out="$WORK/$1/out"
    shift
    step "$name: copy of the tracked tree and the carried paths"
    rm -rf "${WORK:?}/$name"
    mkdir -p "$tree" "$out" "$WORK/$name/home"
    if git rev-parse --is-inside-work-tree > /dev/null 2>&1; then  # what the device call copies: no ignored file
        git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - --ignore-failed-read \
            2> /dev/null | tar -xf - -C "$tree"
    else  # a tree without git: everything but what .gitignore names
        tar -cf - --exclude-vcs-ignores --exclude=./.ci/venvs --exclude=./.ci/rehearsal --exclude=./.venv \
            --exclude=./build --exclude=./.git . | tar -xf - -C "$tree"
    fi
    tar -cf - "${CARRY[@]}" | tar -xf - -C "$tree"
    rm -rf "$tree/.whl/site"  # installed by the run itself
    step "$name: benchmarks/gpu/run.sh, offline, bare HOME, stub nvidia-smi"
    local rc=0
    (cd "$tree" && "${offline[@]}" env -i PATH="$WORK/bin:$(dirname "$GPU_PYTHON"):/usr/bin:/bin" \
        HOME="$WORK/$name/home" OUT="$out" PIP_NO_INDEX=1 PIP_CONFIG_FILE=/dev/null LANG=C.UTF-8 \
        GDRD_GPU_BENCH="$BENCH_FILE" GDRD_GPU_BUDGET_S="${REHEARSAL_BUDGET_S:-1500}" MAX_JOBS=2 \
        TRITON_CACHE_DIR="$WORK/triton-cache" "$@" \
        benchmarks/gpu/run.sh -k "$BENCH_CASES") || rc=$?
    step "$name: run.sh exit $rc (non-zero expected: no GPU test can pass here)"
    "$GPU_PYTHON" - "$out" "$name" <<'EOF'
import glob, json, os, sys
out, name = sys.argv[1:]
def one(pattern):
    found = glob.glob(os.path.join(out, pattern))
    assert found, f"{name}: no {pattern} in {out}: {sorted(os.listdir(out))}"
    return found[0]
for pattern in ("gpu_run_*.log", "gpu_build_*.log", "gpu_pip_list_*.txt", "gpu_outcomes_*.jsonl",
                "gpu_warmup_*.json", "*_correctness.md", "gpu_bench_*_core.json"):
    one(pattern)
with open(one("*_correctness.json")) as f:
    verdict = json.load(f)
assert verdict["status"] == "INCOMPLETE", verdict["status"]
assert sum(verdict["counts"].values()) >= 187, verdict["counts"]  # every GPU test collected
with open(one("gpu_warmup_*.json")) as f:
    warmup = json.load(f)
assert not warmup["failed"] and warmup["configurations"] > 0, warmup
reports = [p for p in glob.glob(os.path.join(out, "*.md")) if "correctness" not in p]
assert reports, f"{name}: no benchmark report in {out}"
log = open(one("gpu_run_*.log")).read()
for phase in ("Triton warm-up", "correctness (GPU tests)", "benchmarks (core)", "seconds: build"):
    assert phase in log, f"{name}: the log lacks {phase!r}"
if name == "injected":
    assert log.count("the GPU tests stopped in") == 2, "the crash and the hang must each end one session"
    assert "session 3" in log and "session 4" not in log
    assert "Timeout" in log, "pytest-timeout must name the hung test"
    assert verdict["counts"].get("did not finish") == 2, verdict["counts"]
print(f"{name}: {out} holds {len(os.listdir(out))} files; verdict {verdict['status']} {verdict['counts']}; "
      f"warm-up {warmup['configurations']} configurations ({warmup['compilations']} compilations) "
      f"in {warmup['seconds']} s on {warmup['jobs']} processes, load {warmup['load_average']}")
EOF
}

rm -rf "$WORK/triton-cache"  # the first run compiles from nothing, as on a fresh GPU machine
rehearse plain
rehearse injected GDRD_GPU_INJECT=crash@20,hang@40 GDRD_GPU_TEST_TIMEOUT_S=20
step "passed"

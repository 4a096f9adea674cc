"""benchmarks/report.py on a hand-made pytest-benchmark JSON: the ratios in the table and the files; the
console summary of a real benchmark run comes after pytest-benchmark's tables."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks import report  # noqa: E402


def bench(group, provider, median_s, peak_bytes, flop=None, nbytes=None):
    """A GPU result: do_bench's median and quantiles in extra_info, pytest-benchmark's host-timed median apart."""
    info = {"provider": provider, "device": "Test GPU 80GB", "peak_extra_bytes": peak_bytes, "torch": "t",
            "triton": "x", "python": "p", "median_s": median_s, "p20_s": 0.9 * median_s, "p80_s": 1.2 * median_s}
    if flop:
        info["flop"] = flop
    if nbytes:
        info["bytes"] = nbytes
    return {"group": group, "name": f"test[{provider}]", "stats": {"median": median_s + 1e-2}, "extra_info": info}


def test_report_table_ratios_and_files(tmp_path):
    data = {"datetime": "2026-11-28T10:00:00", "benchmarks": [
        bench("op A [cuda]", "eager", 0.010, 400 * 2 ** 20),
        bench("op A [cuda]", "compile", 0.005, 200 * 2 ** 20),
        bench("op A [cuda]", "triton", 0.001, 2 ** 20, flop=4e12),
        bench("op A [cuda]", "cuda", 0.002, 3 * 2 ** 10),  # below the 1 MiB resolution: a lower bound
        bench("op B [cuda]", "eager", 0.002, 0),
        bench("op B [cuda]", "cuda", 0.004, 0, nbytes=8e9),
    ]}
    # one run split into two passes (as benchmarks/gpu/run.sh does): the report merges them
    first, second = tmp_path / "core.json", tmp_path / "compile.json"
    first.write_text(json.dumps(dict(data, benchmarks=[b for b in data["benchmarks"] if "compile" not in b["name"]])))
    second.write_text(json.dumps(dict(data, benchmarks=[b for b in data["benchmarks"] if "compile" in b["name"]])))
    (base,) = report.write([str(first), str(second)], [str(tmp_path / "out")])
    assert os.path.basename(base) == "test-gpu-80gb_2026-11-28"
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in open(base + ".md")
             if line.startswith("| op")]
    rows = {(c[0], c[1]): c for c in cells}
    triton = rows[("op A [cuda]", "triton")]
    # median ms, vs eager, vs compile, TFLOP/s, GB/s, peak MB, memory vs eager
    assert triton[2:] == ["1 (0.9-1.2)", "10.00x", "5.00x", "4e+03", "-", "1.0", "400.00x"]
    assert rows[("op A [cuda]", "cuda")][-2:] == ["<1", ">=400x"]  # not 400 MiB / 3 KiB = 136533x
    assert rows[("op B [cuda]", "cuda")][-2:] == ["<1", "-"]  # eager itself unresolved: no ratio
    assert rows[("op B [cuda]", "cuda")][6] == "2000"
    assert rows[("op B [cuda]", "cuda")][3] == "0.50x"
    merged = json.load(open(base + ".json"))
    assert sorted(b["name"] for b in merged["benchmarks"]) == sorted(b["name"] for b in data["benchmarks"])
    assert os.path.getsize(base + ".png") > 10_000


def test_host_cost_cases_count_in_bare_ops_and_show_host_time(tmp_path):
    """benchmarks/test_bench_host_cost.py: its cases in units of the bare op; every GPU case with its host time."""
    cases = [bench("host cost f [cuda]", "eager", 40e-6, 0), bench("host cost f [cuda]", "gdrd_fast", 20e-6, 0),
             bench("host cost one bare torch op [cuda]", "bare-op", 4e-6, 0), bench("op A [cuda]", "eager", 1e-3, 0)]
    for case, host in zip(cases, (30e-6, 25e-6, 3e-6, None)):
        case["extra_info"]["op"] = "op A" if host is None else "host cost"
        if host:
            case["extra_info"]["host_s"] = host
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"datetime": "2026-12-07T10:00:00", "benchmarks": cases}))
    (base,) = report.write([str(path)], [str(tmp_path / "out")])
    lines = open(base + ".md").read().splitlines()
    header = [c.strip() for c in next(line for line in lines if line.startswith("| case")).strip("|").split("|")]
    rows = {tuple(c[:2]): dict(zip(header, c)) for c in
            ([c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| op")
             or line.startswith("| host"))}
    assert rows[("host cost f [cuda]", "gdrd_fast")]["bare ops"] == "5.0"
    assert rows[("host cost f [cuda]", "gdrd_fast")]["host us/call"] == "25.0"
    assert rows[("host cost f [cuda]", "gdrd_fast")]["vs eager"] == "2.00x"
    assert rows[("op A [cuda]", "eager")]["bare ops"] == "-"  # not a host-cost case
    assert rows[("op A [cuda]", "eager")]["host us/call"] == "-"


def test_dispatch_overhead_is_the_dispatch_case_less_the_stub_and_stays_out_of_the_timed_table(tmp_path):
    cases = [bench("host cost f [cpu]", "eager", 40e-6, 0), bench("host cost f [cpu]", "gdrd_fast", 30e-6, 0),
             bench("host cost f [cpu]", report.DISPATCH, 9e-6, 0), bench("host cost f [cpu]", report.STUB, 3e-6, 0),
             bench("host cost g [cpu]", report.DISPATCH, 9e-6, 0),  # no stub: no overhead to report
             bench("host cost one bare torch op [cpu]", "bare-op", 1.5e-6, 0)]
    for case in cases:
        case["extra_info"]["op"] = "host cost"
    path = tmp_path / "host.json"
    path.write_text(json.dumps({"datetime": "2026-12-07T10:00:00", "benchmarks": cases}))
    (base,) = report.write([str(path)], [str(tmp_path / "out")])
    lines = open(base + ".md").read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("Dispatch overhead"))
    assert "one bare op 1.50 us" in lines[start]
    assert lines[start + 4:] == ["| host cost f [cpu] | 6.0 | 4.0 |"]
    timed = [line for line in lines[:start] if line.startswith("| host cost")]
    assert timed and not any(report.DISPATCH in line or report.STUB in line for line in timed)


@pytest.mark.slow
def test_ratio_summary_prints_after_the_benchmark_tables(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks", "test_bench_bank_update.py"),
                          "--benchmark-only", "-p", "no:cacheprovider", "-k", "B64 and (eager or cpu)"],
                         check=False, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    lines = out.stdout.splitlines()
    table = next(i for i, line in enumerate(lines) if line.startswith("Name (time in"))
    summary = next(i for i, line in enumerate(lines) if "gdrd_fast: ratios against the eager reference" in line)
    assert table < summary
    assert any(line.startswith("bank update (both banks) B64") and " eager " in line for line in lines[summary:])


def test_skipped_cases_reach_the_results_with_their_reason(tmp_path):
    """An absent provider is explained: a benchmark that skips (here the Triton kernels, which take CPU
    tensors only in the interpreter) is written into the JSON with pytest's reason, and the report lists it;
    the load average around the run goes into both."""
    results = tmp_path / "run.json"
    out = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "benchmarks", "test_bench_infonce.py"),
                          "--benchmark-only", "-p", "no:cacheprovider", "-k", "B64 and (cpu or triton)",
                          f"--benchmark-json={results}"],
                         check=False, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    skipped = json.loads(results.read_text())["skipped"]
    assert skipped and all(s["reason"] and "triton" in s["test"] for s in skipped), skipped
    (base,) = report.write([str(results)], [str(tmp_path / "out")])
    text = open(base + ".md").read()
    assert "Not measured:" in text
    assert [len(v) for v in json.loads(results.read_text())["load"].values()] == [3, 3]
    assert "Load average (1, 5, 15 min) at the start: " in text
    assert f"| {skipped[0]['test']} | {skipped[0]['reason']} |" in text

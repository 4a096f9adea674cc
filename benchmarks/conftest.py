"""Prints, after the pytest-benchmark tables, one table per op and size with ratios against eager; puts the
GPU run's correctness verdict (benchmarks/gpu/run.sh) and every skipped case with its reason into the results
JSON, so the report says why a provider is absent, and the machine's load average around the run."""
from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

from .harness import EAGER, median_seconds, memory_mb_text, memory_ratio_text


def _rows(config):
    session = getattr(config, "_benchmarksession", None)
    groups = defaultdict(list)
    for bench in getattr(session, "benchmarks", []) or []:
        if bench.stats and bench.stats.rounds:
            groups[bench.group].append(bench)
    return groups


def ratio_table(groups) -> list[str]:
    lines = [f"{'case':<44} {'provider':<22} {'median ms':>10} {'speed-up':>9} {'peak extra MB':>14} {'mem ratio':>10}"]
    for group in sorted(groups):
        benches = groups[group]
        eager = next((b for b in benches if b.extra_info.get("provider") == EAGER), None)
        for b in sorted(benches, key=median_seconds):
            median, mem = median_seconds(b), b.extra_info.get("peak_extra_bytes")
            speed = f"{median_seconds(eager) / median:.2f}x" if eager else "-"
            mem_ratio = memory_ratio_text(eager.extra_info.get("peak_extra_bytes"), mem) if eager else "-"
            mem_mb = memory_mb_text(mem)
            lines.append(f"{group:<44} {b.extra_info.get('provider', b.name):<22} {median * 1e3:>10.2f} "
                         f"{speed:>9} {mem_mb:>14} {mem_ratio:>10}")
    return lines


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own tables, which print from the same hook
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    groups = _rows(config)
    if groups:
        terminalreporter.write_sep("-", "gdrd_fast: ratios against the eager reference (time and peak extra memory)")
        for line in ratio_table(groups):
            terminalreporter.write_line(line)


def pytest_runtest_logreport(report):
    """Skipped cases (an unavailable backend, a peer that cannot take a size), with pytest's reason."""
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        SKIPPED.append({"test": report.nodeid.split("::")[-1], "reason": reason.removeprefix("Skipped: ")})


SKIPPED: list[dict] = []


def pytest_sessionstart(session):
    LOAD["start"] = list(os.getloadavg())


LOAD: dict[str, list[float]] = {}


def pytest_benchmark_update_json(config, benchmarks, output_json):
    """benchmarks/gpu/run.sh checks the kernels before it benchmarks them: its verdict goes into the results.
    The machine's load average (1, 5, 15 min) at the start and end of the run goes in too: on a shared
    machine it says how far the times can be trusted."""
    path = os.environ.get("GDRD_GPU_VERDICT")
    if path and os.path.isfile(path):
        with open(path) as f:
            output_json["correctness"] = json.load(f)
    output_json["skipped"] = list(SKIPPED)
    output_json["load"] = {**LOAD, "end": list(os.getloadavg())}


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session, exitstatus):
    """A benchmark that the GPU script's deadline interrupted (SIGINT) before its first round has no data,
    and pytest-benchmark would fail to write any JSON: drop it, so that the others are still written."""
    session_ = getattr(session.config, "_benchmarksession", None)
    if session_ is not None:
        session_.benchmarks[:] = [bench for bench in session_.benchmarks if bench]
    yield

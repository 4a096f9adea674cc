"""pytest-benchmark JSON -> Markdown table + PNG plot, named by device and date (docs/performance/measuring.md).

    python -m benchmarks.report RESULTS.json [MORE.json ...] --out DIR [--out DIR2 ...]

Several JSON files (one run split into passes) are merged into one result, named after the first.

For every op and size: median time per provider, speed-up against the eager reference, against
torch.compile(reference) and against each installed peer, the time in bare torch ops and the host time
per call on GPU (the host-cost benchmark's) and each call's dispatch overhead, effective TFLOP/s (from the benchmark's
`flop` extra info), effective GB/s (from `bytes`: the least traffic the op needs) and peak extra memory
with its ratio to eager. The JSON is copied alongside.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from collections import defaultdict

from .harness import MEMORY_RESOLUTION, median_seconds, memory_mb_text, memory_ratio, memory_ratio_text

BASELINES = ("eager", "compile")
PEERS = ("flex_attention", "inf-cl")
BARE_OP = "bare-op"  # benchmarks/test_bench_host_cost.py: one bare torch op, the unit of host cost
# benchmarks/test_bench_host_cost.py: a functional call and its backend, both answering from memory
DISPATCH, STUB = "gdrd_fast-dispatch", "backend-stub"


def load(paths: list[str]) -> tuple[dict, list[dict]]:
    """The first file's metadata with every file's benchmarks (those that ran) and skipped cases."""
    merged = None
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if merged is None:
            merged = data
            merged.setdefault("skipped", [])
        else:
            merged["benchmarks"] = merged["benchmarks"] + data["benchmarks"]
            merged["skipped"] = merged["skipped"] + data.get("skipped", [])
    return merged, [b for b in merged["benchmarks"] if b.get("stats")]


def skipped_table(skipped: list[dict]) -> list[str]:
    """Each case that did not run, with the reason pytest gave: an absent provider is explained, not hidden."""
    if not skipped:
        return []
    lines = ["", "Not measured:", "", "| case | reason |", "|---|---|"]
    return lines + [f"| {s['test']} | {s['reason'].replace('|', '/')} |" for s in skipped]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def stem(benches: list[dict], data: dict) -> str:
    device = benches[0]["extra_info"].get("device", "unknown") if benches else "unknown"
    when = data.get("datetime", datetime.datetime.now(datetime.timezone.utc).isoformat())[:10]
    return f"{_slug(device)}_{when}"


def _times(ratio: float | None) -> str:
    return f"{ratio:.2f}x" if ratio is not None else "-"


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return _times(numerator / denominator if numerator and denominator else None)


def _timed(benches: list[dict]) -> list[dict]:
    """The cases that time a whole call (not the dispatch-only pair, which dispatch_table reports)."""
    return [b for b in benches if b["extra_info"].get("provider") not in (DISPATCH, STUB)]


def table(benches: list[dict]) -> list[str]:
    groups = defaultdict(dict)
    for b in _timed(benches):
        groups[b["group"]][b["extra_info"].get("provider", b["name"])] = b
    peers = [p for p in PEERS if any(p in g for g in groups.values())]
    # the host-cost benchmark's unit (one bare torch op) and, on GPU, its host time per call
    bare_bench = next((b for b in benches if b["extra_info"].get("provider") == BARE_OP), None)
    bare = median_seconds(bare_bench) if bare_bench else None
    host = any("host_s" in b["extra_info"] for b in benches)
    header = (["case", "provider", "median ms (p20-p80)", "vs eager", "vs compile"] + [f"vs {p}" for p in peers]
              + ["bare ops"] * bool(bare) + ["host us/call"] * host
              + ["TFLOP/s", "GB/s", "peak extra MB", "memory vs eager"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group in sorted(groups):
        by_provider = groups[group]
        median = {p: median_seconds(b) for p, b in by_provider.items()}
        memory = {p: b["extra_info"].get("peak_extra_bytes") for p, b in by_provider.items()}
        for provider, b in sorted(by_provider.items(), key=lambda kv: median[kv[0]]):
            flop, nbytes = b["extra_info"].get("flop"), b["extra_info"].get("bytes")
            mem = memory[provider]
            spread = (f" ({b['extra_info']['p20_s'] * 1e3:.4g}-{b['extra_info']['p80_s'] * 1e3:.4g})"
                      if "p20_s" in b["extra_info"] else "")  # 4 significant digits: a 5 us kernel reads 0.005
            cells = [group, provider, f"{median[provider] * 1e3:.4g}{spread}"]
            cells += [_ratio(median.get(base), median[provider]) for base in BASELINES]
            cells += [_ratio(median.get(peer), median[provider]) for peer in peers]
            if bare:  # only the host-cost cases are counted in bare ops
                same_op = b["extra_info"].get("op") == bare_bench["extra_info"].get("op")
                cells.append(f"{median[provider] / bare:.1f}" if same_op else "-")
            if host:
                cells.append(f"{b['extra_info']['host_s'] * 1e6:.1f}" if "host_s" in b["extra_info"] else "-")
            cells += [f"{flop / median[provider] / 1e12:.3g}" if flop else "-",
                      f"{nbytes / median[provider] / 1e9:.4g}" if nbytes else "-",
                      memory_mb_text(mem), memory_ratio_text(memory.get("eager"), mem)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def dispatch_table(benches: list[dict]) -> list[str]:
    """Each functional call's dispatch overhead: its time over a backend answering from memory less that
    backend's called directly, in microseconds and in bare torch ops (the host-cost benchmark's)."""
    groups = defaultdict(dict)
    for b in benches:
        groups[b["group"]][b["extra_info"].get("provider")] = median_seconds(b)
    bare = next((g[BARE_OP] for g in groups.values() if BARE_OP in g), None)
    rows = [(group, g[DISPATCH] - g[STUB]) for group, g in sorted(groups.items()) if DISPATCH in g and STUB in g]
    if not rows or not bare:
        return []
    lines = ["", f"Dispatch overhead (`{DISPATCH}` less `{STUB}`; one bare op {bare * 1e6:.2f} us):", "",
             "| case | us | bare ops |", "|---|---|---|"]
    return lines + [f"| {group} | {overhead * 1e6:.1f} | {overhead / bare:.1f} |" for group, overhead in rows]


def plot(benches: list[dict], path: str) -> None:
    """Horizontal bars, one block per case: speed-up (left) and peak-memory ratio (right) against eager."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = defaultdict(dict)
    for b in _timed(benches):
        groups[b["group"]][b["extra_info"].get("provider", b["name"])] = b
    providers = sorted({p for g in groups.values() for p in g if p != "eager"})
    colors = {p: plt.get_cmap("tab10")(i % 10) for i, p in enumerate(providers)}
    rows, ticks, y = [], [], 0.0  # (y, case, provider); a case's block is labelled at its middle
    for name in sorted(groups):
        present = [p for p in providers if p in groups[name]]
        if "eager" not in groups[name] or not present:
            continue
        ticks.append((y + (len(present) - 1) / 2, name))
        rows += [(y + i, name, p) for i, p in enumerate(present)]
        y += len(present) + 1
    fig, axes = plt.subplots(1, 2, figsize=(13, 1.2 + 0.22 * y), sharey=True)
    for ax, title, value in (
            (axes[0], "speed-up vs eager (median time)",
             lambda g, p: median_seconds(g["eager"]) / median_seconds(g[p])),
            (axes[1], f"peak extra memory: eager / provider\n(both floored at {MEMORY_RESOLUTION / 2**20:g} MiB, "
                      "the measurement's resolution)",
             lambda g, p: memory_ratio(g["eager"]["extra_info"].get("peak_extra_bytes"),
                                       g[p]["extra_info"].get("peak_extra_bytes")))):
        for pos, name, provider in rows:
            v = value(groups[name], provider)
            if v:
                ax.barh(pos, v, color=colors[provider], height=0.8)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("ratio against eager (log scale; > 1: better than eager)", fontsize=8)
        ax.grid(axis="x", which="major", linewidth=0.3)
    axes[0].set_yticks([t for t, _ in ticks], [n for _, n in ticks], fontsize=7)
    axes[0].invert_yaxis()
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[p]) for p in providers]
    fig.legend(handles, providers, loc="lower center", ncol=min(len(providers), 6), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.6 / (1.2 + 0.22 * y), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(json_paths: list[str], out_dirs: list[str]) -> list[str]:
    data, benches = load(json_paths)
    name = stem(benches, data)
    info = benches[0]["extra_info"] if benches else {}
    text = [f"# Benchmarks on {info.get('device', 'unknown')} ({data.get('datetime', '')})", "",
            f"torch {info.get('torch')}, triton {info.get('triton')}, python {info.get('python')}. "
            "Times: on GPU triton.testing.do_bench with the L2 flushed (median, p20-p80), on CPU medians of "
            "pytest-benchmark rounds; fwd+bwd per step; TFLOP/s = the op's cost model / median.", ""]
    if "load" in data:  # benchmarks/conftest.py: the load average around the run (a shared machine's noise)
        loadavg = data["load"]
        text += ["Load average (1, 5, 15 min) "
                 + ", ".join(f"at the {when}: {' / '.join(f'{v:.2f}' for v in loadavg[when])}"
                             for when in ("start", "end") if when in loadavg)
                 + f" on {data.get('machine_info', {}).get('cpu', {}).get('count', '?')} cores.", ""]
    if "correctness" in data:  # benchmarks/gpu/run.sh: the kernels' check against the float64 reference
        verdict = data["correctness"]
        text += [f"Correctness of the kernels benchmarked here (float64 reference, fp32/fp16/bf16): "
                 f"**{verdict['status']}** ({', '.join(f'{k} {v}' for k, v in sorted(verdict['counts'].items()))}).",
                 ""]
    text += table(benches) + dispatch_table(benches) + skipped_table(data.get("skipped", []))
    written = []
    for out in out_dirs:
        os.makedirs(out, exist_ok=True)
        base = os.path.join(out, name)
        with open(base + ".md", "w") as f:
            f.write("\n".join(text) + "\n")
        if [os.path.abspath(p) for p in json_paths] != [os.path.abspath(base + ".json")]:
            with open(base + ".json", "w") as f:
                json.dump(data, f, indent=4)
        if benches:
            plot(benches, base + ".png")
        written.append(base)
    return written


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output(s) of one run")
    parser.add_argument("--out", action="append", required=True, help="output directory (repeatable)")
    args = parser.parse_args(argv)
    for base in write(args.json, args.out):
        print(f"wrote {base}.md / .json / .png")


if __name__ == "__main__":
    main()

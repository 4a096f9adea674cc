"""The correctness verdict of a GPU run: every GPU test's outcome (collected by tests/conftest.py into
GDRD_GPU_OUTCOMES) as one table of kernel x dtype, written beside the benchmark results.

    python -m benchmarks.gpu.verdict OUTCOMES.json --out DIR [--out DIR2 ...]

PASS: every GPU test ran and passed, and each kernel with dtype cases passed in float32, float16 and
bfloat16. FAIL: a test failed or errored. INCOMPLETE: nothing failed, but something did not run (skipped,
cut by the deadline) or a dtype is not covered: a skipped test is never counted as a pass.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from collections import Counter, defaultdict

DTYPES = ("float32", "float16", "bfloat16")


def verdict(outcomes: dict[str, dict]) -> dict:
    rows: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for info in outcomes.values():
        rows[(info["op"], info["kernel"])][info["dtype"] or "-"].append(info["outcome"])
    counts = Counter(info["outcome"] for info in outcomes.values())
    missing = [f"{op}/{kernel}: {dtype}" for (op, kernel), cells in sorted(rows.items())
               if set(cells) & set(DTYPES) for dtype in DTYPES if "passed" not in cells.get(dtype, [])]
    problems = [f"{nodeid}: {info['outcome']} {info['message']}".strip() for nodeid, info in sorted(outcomes.items())
                if info["outcome"] != "passed"]
    if counts["failed"] or counts["error"]:
        status = "FAIL"
    elif not outcomes or len(outcomes) != counts["passed"] or missing:
        status = "INCOMPLETE"
    else:
        status = "PASS"
    table = [{"op": op, "kernel": kernel,
              **{dtype: f"{cells[dtype].count('passed')}/{len(cells[dtype])}" for dtype in cells}}
             for (op, kernel), cells in sorted(rows.items())]
    return {"status": status, "counts": dict(counts), "table": table, "dtypes_not_proven": missing,
            "not_passed": problems}


def markdown(result: dict, device: str) -> list[str]:
    columns = [*DTYPES, "-"]
    lines = [f"## Correctness on {device}: {result['status']}", "",
             "Every CUDA and Triton kernel against the float64 reference (passed/run per dtype; `-`: tests "
             f"without a dtype). Outcomes: {', '.join(f'{k} {v}' for k, v in sorted(result['counts'].items()))}.",
             "", "| op | kernel | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in result["table"]:
        lines.append(f"| {row['op']} | {row['kernel']} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    if result["dtypes_not_proven"]:
        lines += ["", "Not proven (no passing test): " + "; ".join(result["dtypes_not_proven"])]
    if result["not_passed"]:
        lines += ["", "Did not pass:", *[f"- `{p}`" for p in result["not_passed"][:50]]]
    return lines


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "no GPU (dry run)"


def write(outcomes_path: str, out_dirs: list[str]) -> dict:
    with open(outcomes_path) as f:
        result = verdict(json.load(f))
    device = device_name()
    result["device"] = device
    stem = f"{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}_" \
           f"{datetime.datetime.now(datetime.timezone.utc).date()}_correctness"
    text = markdown(result, device)
    for out in out_dirs:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, stem + ".md"), "w") as f:
            f.write("\n".join(text) + "\n")
        with open(os.path.join(out, stem + ".json"), "w") as f:
            json.dump(result, f, indent=1)
    shown = text if len(result["not_passed"]) <= 10 else text[:-(len(result["not_passed"][:50]) - 10)]
    print("\n".join(shown))
    if len(shown) < len(text):
        print(f"- ... the whole list in {os.path.join(out_dirs[-1], stem + '.md')}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outcomes", help="the JSON that tests/conftest.py wrote to GDRD_GPU_OUTCOMES")
    parser.add_argument("--out", action="append", required=True, help="output directory (repeatable)")
    args = parser.parse_args(argv)
    return 0 if write(args.outcomes, args.out)["status"] == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())

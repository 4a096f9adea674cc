"""The correctness verdict of a GPU run: every GPU test's outcome (appended by tests/conftest.py to
GDRD_GPU_OUTCOMES, one JSON line per event) as one table of kernel x dtype, written beside the benchmark
results.

    python -m benchmarks.gpu.verdict OUTCOMES.jsonl --out DIR [--out DIR2 ...]

PASS: every GPU test ran and passed, and each kernel with dtype cases passed in float32, float16 and
bfloat16. FAIL: a test failed or errored. INCOMPLETE: nothing failed, but something did not run (skipped,
crashed, cut by the deadline, never written) or a dtype is not covered: a skipped test is never a pass.
A missing, empty or partial file is INCOMPLETE too, with the list of what did run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
from collections import Counter, defaultdict

DTYPES = ("float32", "float16", "bfloat16")  # every kernel with dtype cases must pass in each
COLUMNS = ("float64", *DTYPES, "other")  # "other": a test without a floating dtype parameter
_RANK = {"passed": 0, "skipped": 1, "failed": 2, "error": 2}  # a teardown error after a pass is an error


def read_outcomes(path: str) -> tuple[dict[str, dict], list[str]]:
    """({nodeid: {op, kernel, dtype, outcome, message}}, notes on what the file lacks) from the JSON lines.

    A test that started but never reported crashed the run or was cut by its deadline: "did not finish".
    """
    notes = []
    if not os.path.exists(path):
        return {}, [f"no outcomes file {path}: the tests did not start"]
    tests: dict[str, dict] = {}
    finished = False
    with open(path) as f:
        lines = f.read().split("\n")
    if lines[-1]:
        notes.append("the last line was cut while being written")
    for line in lines[:-1]:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # torn by a crash, then a resumed session wrote on after it
            notes.append(f"an unreadable line: {line[:80]}")
            continue
        kind, nodeid = event.pop("event"), event.pop("nodeid", None)
        if kind == "collected":
            tests[nodeid] = {**event, "outcome": "not run", "message": ""}
        elif kind == "start" and nodeid in tests:
            tests[nodeid]["outcome"] = "did not finish"
        elif kind == "outcome" and nodeid in tests:
            info = tests[nodeid]
            if info["outcome"] not in _RANK or _RANK[event["outcome"]] >= _RANK[info["outcome"]]:
                info.update(outcome=event["outcome"], message=event["message"])
        elif kind == "finished":
            finished = True
    if not tests:
        notes.append(f"{path} names no GPU test: the collection did not finish")
    elif not finished:
        notes.append("the last pytest session did not finish (crashed, hung or cut by the deadline)")
    return tests, notes


def verdict(outcomes: dict[str, dict], notes: list[str] = ()) -> dict:
    rows: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for info in outcomes.values():
        rows[(info["op"], info["kernel"])][info["dtype"]].append(info["outcome"])
    counts = Counter(info["outcome"] for info in outcomes.values())
    missing = [f"{op}/{kernel}: {dtype}" for (op, kernel), cells in sorted(rows.items())
               if set(cells) & set(DTYPES) for dtype in DTYPES if "passed" not in cells.get(dtype, [])]
    problems = [f"{nodeid}: {info['outcome']} {info['message']}".strip() for nodeid, info in sorted(outcomes.items())
                if info["outcome"] != "passed"]
    if counts["failed"] or counts["error"]:
        status = "FAIL"
    elif notes or not outcomes or len(outcomes) != counts["passed"] or missing:
        status = "INCOMPLETE"
    else:
        status = "PASS"
    table = [{"op": op, "kernel": kernel,
              **{dtype: f"{cells[dtype].count('passed')}/{len(cells[dtype])}" for dtype in cells}}
             for (op, kernel), cells in sorted(rows.items())]
    ran = sorted(nodeid for nodeid, info in outcomes.items() if info["outcome"] not in ("not run", "did not finish"))
    return {"status": status, "counts": dict(counts), "table": table, "dtypes_not_proven": missing,
            "not_passed": problems, "notes": list(notes), "ran": ran}


def markdown(result: dict, device: str) -> list[str]:
    columns = COLUMNS
    lines = [f"## Correctness on {device}: {result['status']}", "",
             *[f"- {note}" for note in result["notes"]], *([""] if result["notes"] else []),
             "Every CUDA and Triton kernel against the float64 reference (passed/total per dtype; `other`: tests "
             f"without a floating dtype parameter). Outcomes: {', '.join(f'{k} {v}' for k, v in sorted(result['counts'].items()))}.",
             "", "| op | kernel | " + " | ".join(columns) + " |", "|---|---|" + "---|" * len(columns)]
    for row in result["table"]:
        lines.append(f"| {row['op']} | {row['kernel']} | " + " | ".join(row.get(c, "") for c in columns) + " |")
    if result["dtypes_not_proven"]:
        lines += ["", "Not proven (no passing test): " + "; ".join(result["dtypes_not_proven"])]
    if result["not_passed"]:
        lines += ["", "Did not pass:", *[f"- `{p}`" for p in result["not_passed"][:50]]]
    if result["status"] != "PASS":
        lines += ["", f"Ran to the end ({len(result['ran'])}):", *[f"- `{n}`" for n in result["ran"]]]
    return lines


def device_name() -> str:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return "no GPU (dry run)"


_SHOWN = 60  # lines of the verdict printed to the log


def write(outcomes_path: str, out_dirs: list[str], json_copy: str | None = None) -> dict:
    result = verdict(*read_outcomes(outcomes_path))
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
    if json_copy:
        with open(json_copy, "w") as f:
            json.dump(result, f, indent=1)
    print("\n".join(text[:_SHOWN]))
    if len(text) > _SHOWN:
        print(f"... the rest in {os.path.join(out_dirs[-1], stem + '.md')}")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outcomes", help="the JSON lines that tests/conftest.py appended to GDRD_GPU_OUTCOMES")
    parser.add_argument("--out", action="append", required=True, help="output directory (repeatable)")
    parser.add_argument("--json-copy", help="also write the verdict's JSON to this path (for the benchmarks)")
    args = parser.parse_args(argv)
    return 0 if write(args.outcomes, args.out, args.json_copy)["status"] == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Evaluation outputs: JSON (everything), a Markdown table (the headline numbers), a ROC plot.

Every output names the data set it was measured on; a synthetic set's name says "synthetic".
"""
from __future__ import annotations

import io
import json
import os
import textwrap
from pathlib import Path
from typing import Mapping, Sequence

from ..data.images import atomic_write_bytes
from .verification import VerificationResult


def write_json(path: str | os.PathLike, payload: Mapping) -> Path:
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode())
    return path


def markdown_table(rows: Sequence[Mapping], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; floats in [0, 1] are shown as percentages with two decimals."""
    if not rows:
        raise ValueError("rows must not be empty")
    columns = list(columns or rows[0].keys())

    def cell(value) -> str:
        if isinstance(value, float):
            return f"{100 * value:.2f}" if 0.0 <= value <= 1.0 else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def verification_rows(results: Mapping[str, VerificationResult]) -> list[dict]:
    """One row per named result (e.g. 'student 16x16'), accuracies in percent."""
    return [{"model": name, "accuracy %": r.accuracy, "std %": r.accuracy_std,
             f"TAR@FAR={r.far_target:g} %": r.tar, "AUC %": r.auc, "pairs": r.num_pairs}
            for name, r in results.items()]


def plot_roc(path: str | os.PathLike, results: Mapping[str, VerificationResult], title: str) -> Path:
    """ROC curves (TAR vs FAR, log FAR axis) of every named result into a PNG, with matplotlib's Agg."""
    # A bare Figure renders PNG through Agg without pyplot: no GUI, and the caller's backend is untouched.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4.5), dpi=120)
    ax = fig.add_subplot()
    for name, r in results.items():
        fpr = [max(f, 1e-4) for f in r.roc_fpr]
        ax.step(fpr, r.roc_tpr, where="post", label=f"{name} ({100 * r.accuracy:.2f}%)")
    ax.set_xscale("log")
    ax.set_xlim(1e-4, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel("false accept rate")
    ax.set_ylabel("true accept rate")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)  # long dataset notes stay inside the figure
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_verification_report(out_dir: str | os.PathLike, dataset: str,
                              results: Mapping[str, VerificationResult], extra: Mapping | None = None) -> dict[str, Path]:
    """results.json, results.md and roc.png in out_dir, each naming `dataset`."""
    if not results:
        raise ValueError("results must not be empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"dataset": dataset, "protocol": "LFW verification (insightface conventions, docs/method/evaluation.md)",
               "results": {name: r.as_dict() for name, r in results.items()}, **(extra or {})}
    table = f"# Verification on {dataset}\n\n" + markdown_table(verification_rows(results))
    md = out / "results.md"
    atomic_write_bytes(md, table.encode())
    return {"json": write_json(out / "results.json", payload), "markdown": md,
            "roc": plot_roc(out / "roc.png", results, f"ROC on {dataset}")}


def identification_rows(cmc_results: Mapping[str, Mapping[int, float]],
                        linear_probe_results: Mapping[str, float] | None = None) -> list[dict]:
    """One row per model: CMC rank-k in percent, and the linear-probe top-1 where given."""
    rows = []
    for name, ranks in cmc_results.items():
        row = {"model": name, **{f"rank-{k} %": float(v) for k, v in ranks.items()}}
        if linear_probe_results is not None and name in linear_probe_results:
            row["linear probe top-1 %"] = float(linear_probe_results[name])
        rows.append(row)
    return rows


def write_identification_report(out_dir: str | os.PathLike, dataset: str, cmc_results: Mapping[str, Mapping[int, float]],
                                linear_probe_results: Mapping[str, float] | None = None,
                                subsets: Mapping[str, Mapping[str, dict]] | None = None) -> dict[str, Path]:
    """identification.json and identification.md in out_dir, each naming `dataset`. subsets: per model,
    the output of identification.subset_report (AR-style), shown as one table per model."""
    if not cmc_results:
        raise ValueError("cmc_results must not be empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"dataset": dataset, "protocol": "closed-set identification, cosine scores (docs/method/evaluation.md)",
               "cmc": {name: {str(k): v for k, v in r.items()} for name, r in cmc_results.items()},
               "linear_probe_top1": dict(linear_probe_results or {}),
               "subsets": {m: {s: {"probes": v["probes"], "cmc": {str(k): a for k, a in v["cmc"].items()}}
                               for s, v in per.items()} for m, per in (subsets or {}).items()}}
    text = f"# Identification on {dataset}\n\n" + markdown_table(identification_rows(cmc_results, linear_probe_results))
    for model, per in (subsets or {}).items():
        rows = [{"subset": s, "probes": v["probes"], **{f"rank-{k} %": a for k, a in v["cmc"].items()}}
                for s, v in per.items()]
        text += f"\n## {model}: per subset\n\n" + markdown_table(rows)
    md = out / "identification.md"
    atomic_write_bytes(md, text.encode())
    return {"json": write_json(out / "identification.json", payload), "markdown": md}

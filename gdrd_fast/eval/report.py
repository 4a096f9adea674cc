"""Evaluation outputs: JSON (everything), a Markdown table (the headline numbers), a ROC plot.

Every output names the data set it was measured on; a synthetic set's name says "synthetic".
"""
from __future__ import annotations

import io
import json
import os
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
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure   # no pyplot: no global figure state, no GUI backend

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
    ax.set_title(title, fontsize=9)
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
    payload = {"dataset": dataset, "protocol": "LFW verification (insightface conventions, method.md section 6)",
               "results": {name: r.as_dict() for name, r in results.items()}, **(extra or {})}
    table = f"# Verification on {dataset}\n\n" + markdown_table(verification_rows(results))
    md = out / "results.md"
    atomic_write_bytes(md, table.encode())
    return {"json": write_json(out / "results.json", payload), "markdown": md,
            "roc": plot_roc(out / "roc.png", results, f"ROC on {dataset}")}

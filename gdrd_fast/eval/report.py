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


def save_png(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """A matplotlib figure as a PNG, written atomically (a stopped run leaves no half-written plot)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
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


def _far_label(far: float) -> str:
    return f"{far:.2g}"


def verification_rows(results: Mapping[str, VerificationResult]) -> list[dict]:
    """One row per named result (e.g. 'student 16x16'), accuracies in percent. The TAR column is labelled
    with the FAR it was measured at (far_level: never finer than the impostor count resolves); rows at
    different levels get a FAR column instead."""
    levels = {_far_label(r.far_level) for r in results.values()}
    tar_column = f"TAR@FAR={levels.pop()} %" if len(levels) == 1 else "TAR %"
    rows = []
    for name, r in results.items():
        row = {"model": name, "accuracy %": r.accuracy, "std %": r.accuracy_std, tar_column: r.tar}
        if tar_column == "TAR %":
            row["at FAR"] = _far_label(r.far_level)
        rows.append(row | {"AUC %": r.auc, "pairs": r.num_pairs})
    return rows


def resolution_note(results: Mapping[str, VerificationResult]) -> str:
    """A sentence for reports where the data could not resolve the FAR asked for ('' where it could)."""
    coarse = [r for r in results.values() if r.far_level > r.far_target]
    if not coarse:
        return ""
    r = coarse[0]
    return (f"TAR is reported at FAR={_far_label(r.far_level)}, not the {r.far_target:g} asked for: with "
            f"{r.num_impostors} impostor pairs (about {round(1 / r.far_level)} per 9-fold training split) the "
            "smallest false accept rate above 0 is 1 / that count.")


def roc_figure(results: Mapping[str, VerificationResult], title: str):
    """ROC curves (TAR vs FAR, log FAR axis from the smallest FAR the impostor count resolves) of every
    named result, the FAR of the reported TAR dotted; the legend sits below the axes, off the curves."""
    # A bare Figure renders PNG through Agg without pyplot: no GUI, and the caller's backend is untouched.
    from matplotlib.figure import Figure

    # FAR of one accepted impostor (a decade wide at least, for sets of one or two impostors)
    floor = min([0.1] + [1.0 / max(r.num_impostors, 1) for r in results.values()])
    fig = Figure(figsize=(6.0, 4.2 + 0.22 * len(results)), dpi=120)
    ax = fig.add_subplot()
    for name, r in results.items():
        fpr = [max(f, floor) for f in r.roc_fpr]  # FAR 0 is drawn at the left edge of the log axis
        ax.step(fpr, r.roc_tpr, where="post", label=f"{name}: accuracy {100 * r.accuracy:.2f}%")
    for level in sorted({r.far_level for r in results.values()}):
        ax.axvline(level, color="grey", linestyle=":", linewidth=1, label=f"FAR={_far_label(level)} (TAR column)")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(0.0, 1.01)
    ax.set_xlabel(f"false accept rate (FAR, log scale; 1 impostor pair = {floor:.2g})")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=9)  # long dataset notes stay inside the figure
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    return fig


def plot_roc(path: str | os.PathLike, results: Mapping[str, VerificationResult], title: str) -> Path:
    """roc_figure into a PNG (the legend included)."""
    return save_png(roc_figure(results, title), path, bbox_inches="tight")


def write_verification_report(out_dir: str | os.PathLike, dataset: str, results: Mapping[str, VerificationResult],
                              extra: Mapping | None = None) -> dict[str, Path]:
    """results.json, results.md and roc.png in out_dir, each naming `dataset`."""
    if not results:
        raise ValueError("results must not be empty")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"dataset": dataset, "protocol": "LFW verification (insightface conventions, docs/method/evaluation.md)",
               "results": {name: r.as_dict() for name, r in results.items()}, **(extra or {})}
    note = resolution_note(results)
    table = f"# Verification on {dataset}\n\n" + markdown_table(verification_rows(results))
    table += f"\n{note}\n" if note else ""
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


def write_identification_report(out_dir: str | os.PathLike, dataset: str,
                                cmc_results: Mapping[str, Mapping[int, float]],
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

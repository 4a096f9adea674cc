"""The offline demo: a small ablation of GDRD against its alternatives, at 16x16, on CPU in minutes.

Data: the SYNTHETIC face set of gdrd_fast.data.synthetic (identity partly in coarse geometry that
survives 16x16, partly in fine detail that does not), or a real identity folder + insightface .bin.
Models: an HR ArcFace teacher, a briefly trained diffusers UNet denoiser (the generative teacher),
then, on the same step budget and over several seeds, the students of ablation.variants (baseline,
CRD, CRRCD, GDRD, GDRD end to end by default). It reports the table (verification + linear probe,
mean +- std over seeds), the feature geometry of the GDRD student, and what the numbers do and do not show.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from ..data.images import atomic_write_bytes
from ..eval import save_png, write_json
from ..train import Runtime, log_to_file
from ..train.checks import file_sha256
from ..train.config import to_dict
from .ablate import run_grid
from .analyze import analyze_cell
from .config import DemoConfig
from .data import SYNTHETIC_NOTE
from .interpret import interpret

log = logging.getLogger("gdrd_fast.demo")
SMOKE_NOTE = ("SMOKE RUN (--quick): tiny models trained for a few steps to check the whole path; "
              "its numbers mean nothing.")


def plot_training(path: Path, histories: dict[str, list[dict]], title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4 * min(3, len(histories)), 3.2 * ((len(histories) + 2) // 3)), dpi=100)
    for i, (label, history) in enumerate(histories.items()):
        ax = fig.add_subplot((len(histories) + 2) // 3, min(3, len(histories)), i + 1)
        terms = [k for k in history[0] if k != "step"]
        for term in (["loss"] if len(terms) == 2 else terms):  # one term: it is the loss
            ax.plot([h["step"] for h in history], [h[term] for h in history], label=term, lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def _geometry_key(cell: Path) -> dict:
    """What the geometry of a cell depends on: its trained student and the teachers."""
    teachers = Path(json.loads((cell / "spec.json").read_text())["grid_dir"]) / "teachers"
    files = [cell / "result.json", cell / "student.pt", cell / "stage1_backbone.pt", teachers / "hr_teacher.pt",
             teachers / "denoiser.pt"]
    return {str(f): file_sha256(f) if f.is_file() else None for f in files}


def _saved_geometry(cell: Path, out: Path) -> dict | None:
    """The geometry an earlier run of this demo wrote for the same cell and teachers (a rerun reads it back)."""
    saved = out / "geometry_result.json"
    if not saved.is_file():
        return None
    data = json.loads(saved.read_text())
    if data.get("key") != _geometry_key(cell) or not all(Path(p).is_file() for p in data["result"]["paths"].values()):
        return None
    log.info("feature geometry: read back from %s", saved)
    return data["result"] | {"paths": {k: Path(p) for k, p in data["result"]["paths"].items()}}


def _save_geometry(cell: Path, out: Path, geometry: dict) -> None:
    write_json(out / "geometry_result.json", {"key": _geometry_key(cell), "result": geometry | {
        "paths": {k: str(p) for k, p in geometry["paths"].items()}}})


def run_demo(output_dir: str | Path, config: DemoConfig, train_root: str | None = None, pairs: str | None = None,
             device: str = "cpu", progress: bool = True, jobs: int = 0, threads: int = 1) -> dict:
    """The demo's ablation (config.ablation.variants at config.resolution over config.ablation.seeds seeds),
    the feature geometry of its GDRD student, and a text of what the numbers show; writes results.md,
    results.json, ablation.png, training.png, geometry/ and demo.log beside the grid's cells/ and teachers/."""
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.create(device)
    handler = log_to_file(out / "demo.log", runtime)  # appended: an earlier run's log stays above this one's
    try:
        log.info("gdrd-fast demo: a new run in %s", out)
        a = config.ablation
        variant = next((v for v in ("gdrd", "gdrd-e2e", "gdrd-unfrozen") if v in a.variants), None)
        cell = out / "cells" / f"{variant}-r{config.resolution}-s0"
        # the geometry, in a grid process as soon as its cell is trained (at the main process's thread count)
        after = {str(cell): ("gdrd_fast.demo.analyze:analyze_job", {
            "run": str(cell), "out_dir": str(out / "geometry"), "device": device, "threads": torch.get_num_threads(),
            "cost": 300.0})} if variant is not None and train_root is None else {}
        summary = run_grid(out, config, a.variants, [config.resolution], a.seeds, train_root, pairs, device, jobs,
                           threads, progress, after_cell=after)
        geometry = None
        if variant is not None and summary["note"] == SYNTHETIC_NOTE:  # needs labelled test images
            geometry = summary["after_cell"].get(str(cell)) or _saved_geometry(cell, out / "geometry") \
                or analyze_cell(cell, out / "geometry", device=device)
            _save_geometry(cell, out / "geometry", geometry)
        text = interpret(summary, geometry, config)
        note = f"{SMOKE_NOTE} {summary['note']}" if config.smoke else summary["note"]
        if config.smoke:
            log.info("%s", SMOKE_NOTE)
        elapsed = time.perf_counter() - start
        r = config.resolution
        md = ([f"**{SMOKE_NOTE}**", ""] if config.smoke else []) + [
            summary["markdown"].rstrip(), "", "## What the numbers show, and what they do not", "", text, ""]
        if geometry is not None:
            md += [geometry["markdown"].replace("# Feature geometry", "## Feature geometry"), ""]
        md += [f"Total demo time {elapsed:.0f} s ({summary['machine']}).", ""]
        paths = {"markdown": out / "results.md", "json": out / "results.json", "ablation": summary["paths"]["figure"],
                 "training": out / "training.png", "log": out / "demo.log"}
        if geometry is not None:
            paths |= {"geometry_" + k: v for k, v in geometry["paths"].items()}
        atomic_write_bytes(paths["markdown"], "\n".join(md).encode())
        write_json(paths["json"], {
            "synthetic": summary["note"] == SYNTHETIC_NOTE, "smoke_run": config.smoke, "note": note,
            "dataset": summary["dataset"],
            "protocol": "LFW verification (insightface conventions, docs/method/evaluation.md) + linear probe",
            "ablation": {k: summary[k] for k in ("students", "references", "cells", "jobs", "threads", "machine")},
            "teachers": summary["teachers"],
            "geometry": None if geometry is None else {k: geometry[k] for k in ("features", "cka")},
            "interpretation": text, "timings_s": {"teachers": summary["teacher_timings_s"], "total": elapsed},
            "config": to_dict(config)})
        histories = dict(summary["histories"])
        for cell in sorted((out / "cells").glob(f"*-r{r}-s0/result.json")):
            result = json.loads(cell.read_text())
            for stage, history in result["history"].items():
                if history:
                    histories[f"{result['variant']} {stage}"] = history
        plot_training(paths["training"], histories, f"Training losses (seed 0), {summary['dataset']}")
        log.info("wrote %s in %.0f s", ", ".join(str(p) for p in paths.values()), elapsed)
        table = summary["markdown"]
        return {"summary": summary, "geometry": geometry, "table": table, "text": text, "note": note,
                "paths": paths, "elapsed_s": elapsed}
    finally:
        if handler is not None:
            logging.getLogger("gdrd_fast").removeHandler(handler)

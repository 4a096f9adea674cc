"""`gdrd-fast ablate`: a grid of training variants x input resolutions x seeds on the demo's data.

The teachers (HR ArcFace network, diffusion denoiser) are trained once per grid, from the recipe's seed,
and saved in <out>/teachers/; the grid's seeds vary each student's initialisation, batch order and
random draws. Every cell (variant, resolution, seed) runs in its own process when --jobs > 1, writes
its checkpoints, log and result.json to <out>/cells/<variant>-r<res>-s<seed>/, and is skipped when its
result exists: a stopped grid resumes (a cell stopped mid-way resumes from its last checkpoint).
Outputs: ablation.md, ablation.json (mean +- std over seeds, ddof=1) and ablation.png.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .. import models
from ..data import degrade
from ..eval import extract_embeddings, markdown_table, save_png, verify, write_json
from ..eval.geometry import probe_accuracy
from ..train import Runtime, Trainer, log_to_file, seed_everything
from ..train import checkpoint as ckpt, teacher_cache
from ..train.config import GENERATIVE_VARIANTS, VARIANTS, from_dict, to_dict
from ..train.checks import file_sha256
from ..train.pipeline import Parts, variant_plan
from .config import DemoConfig
from .data import data_cache_dir, data_note, load_cell_data
from .nets import SmallFaceNet
from .processes import Pool, step_reporter
from .teachers import cache_path, cache_teacher_outputs, load_generative_teacher, load_hr_teacher, load_teachers, \
    teacher_feature, teacher_paths, train_teachers

log = logging.getLogger("gdrd_fast.demo")
TG_ROW = "generative teacher T_g (denoiser encoder, flattened)"
PIXELS_ROW = "the LR face's own pixels (flattened)"
RANDOM_ROW = "untrained student (random features)"
# TAR is measured at the smallest FAR the pairs resolve (gdrd_fast.eval.verify); the table names that FAR
METRICS = {"accuracy": "verification acc %", "tar": "TAR %", "auc": "AUC %", "probe": "probe acc %"}


# --- one cell ----------------------------------------------------------------------------------------
def cell_name(variant: str, resolution: int, seed: int) -> str:
    return f"{variant}-r{resolution}-s{seed}"


def cell_config(config: DemoConfig, resolution: int, seed: int) -> DemoConfig:
    """The recipe of one cell: its resolution; the student's seed (data and teachers keep config.seed)."""
    data = to_dict(config)
    data.update(resolution=resolution, student_seed=seed)
    return from_dict(DemoConfig, data)


def student_features(net, variant: str):
    """What a variant's student is judged by: its embedding, or (stage1-probe) the flattened S_b feature."""
    if variant == "stage1-probe":
        return lambda x: net.backbone(x).flatten(1)
    return net


def evaluate(model, data: dict, transform, device, desc: str) -> dict:
    """Verification on the pairs (LFW protocol) and, where the test set has labels, a linear probe."""
    emb = extract_embeddings(model, data["pair_images"], transform=transform, device=device, progress=False,
                             desc=desc)
    result = verify(emb[0::2], emb[1::2], data["issame"]).as_dict()
    out = {k: result[k] for k in ("accuracy", "accuracy_std", "tar", "far_level", "auc", "num_pairs")}
    if data.get("probe_images") is not None:
        feats = extract_embeddings(model, data["probe_images"], transform=transform, device=device, flip=False,
                                   progress=False, desc=desc)
        out["probe"] = probe_accuracy(feats, data["probe_labels"])
    return out


def run_cell(spec: dict, report: Callable[..., None] | None = None) -> dict:
    """Train and evaluate one (variant, resolution, seed) cell; the worker of the grid. Returns its result.
    report(stage=, step=, total=): where the cell's training is, in steps of all its stages."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    out, grid = Path(spec["cell_dir"]), Path(spec["grid_dir"])
    config = from_dict(DemoConfig, spec["config"])
    variant, r, seed = spec["variant"], config.resolution, config.student_seed
    runtime = Runtime.create(spec.get("device", "cpu"))
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "spec.json", {k: v for k, v in spec.items() if k != "progress"})
    handler = log_to_file(out / "train.log", runtime)
    start = time.perf_counter()
    try:
        data = load_cell_data(config, spec.get("train_root"), spec.get("pairs"), data_cache_dir(grid))
        train_set = data["train"]
        num_classes = int(train_set.targets.max()) + 1
        teacher, teacher_head = load_hr_teacher(config, grid, num_classes)
        # loaded only by the variants that use it (it may still be training while the others run)
        encoder = functools.cache(lambda: load_generative_teacher(config, grid))
        seed_everything(seed)  # the same seed gives every variant the same initial student
        net = SmallFaceNet(config.width, config.image_size, config.embedding_dim)
        s2 = config.stage2

        def classifier():
            return models.ArcFaceHead(config.embedding_dim, num_classes, s2.arcface_scale, s2.arcface_margin)

        cache = cache_path(grid, r)  # written once the teachers are (a cell started before reads no cache)
        cache = teacher_cache.TeacherCache(cache) if teacher_cache.is_complete(cache) else None
        parts = Parts(runtime, net.backbone, net.head, classifier, lambda: (teacher, teacher_head), encoder,
                      len(train_set), config.embedding_dim, config.backend, config.denoiser.image_size,
                      config.denoiser.timestep, config.denoiser.noise)
        histories, steps, done_steps, cached = {}, {}, 0, {}
        plan = variant_plan(variant, parts, config.stage1, s2, config.student_budget)
        total_steps = sum(planned.optim.steps for planned in plan)
        for planned in plan:
            hooks = [step_reporter(report, done_steps, total_steps)] if report is not None else []
            trainer = Trainer(planned.build(), train_set, runtime, planned.optim, batch_size=config.batch_size,
                              seed=seed, resolution=r, log_every=max(1, (planned.optim.steps or 10) // 10),
                              progress=spec.get("progress", False), name=f"{variant} {planned.name}",
                              group_optims=planned.group_optims, output_dir=out,
                              checkpoint_every=config.ablation.checkpoint_every,
                              meta={"variant": variant, "resolution": r, "seed": seed}, step_hooks=hooks,
                              teacher_cache=cache)
            saved = out / f"{planned.name}.pt"
            if saved.is_file():  # a stopped cell: continue (or skip a finished stage) from its checkpoint
                trainer.resume(saved)
            trainer.train_steps()
            trainer.save()
            histories[planned.name], steps[planned.name] = trainer.history, trainer.step
            cached[planned.name] = sorted(getattr(trainer.dataset, "outputs", ()))  # read from the teacher cache
            done_steps += planned.optim.steps
            if planned.name == "stage1":
                ckpt.save_checkpoint(net.backbone.state_dict(), out / "stage1_backbone.pt")
        ckpt.save_checkpoint(net.state_dict(), out / "student.pt")
        train_s = time.perf_counter() - start
        net.eval()
        result = {"variant": variant, "resolution": r, "seed": seed, "steps": steps,
                  "metrics": evaluate(student_features(net, variant), data, lambda x: degrade(x, r), runtime.device,
                                      f"{variant} r{r} s{seed}"),
                  "train_s": train_s, "total_s": time.perf_counter() - start, "threads": torch.get_num_threads(),
                  "teacher_cache": {"folder": str(cache.folder), "read": cached} if cache is not None else None,
                  "history": {k: v[:: max(1, len(v) // 50)] for k, v in histories.items()},
                  "spec_hash": spec["spec_hash"]}
        write_json(out / "result.json", result)
        log.info("%s r%d seed %d: %s in %.0f s", variant, r, seed, result["metrics"], result["total_s"])
        return result
    finally:
        if handler is not None:
            logging.getLogger("gdrd_fast").removeHandler(handler)


# --- the grid ----------------------------------------------------------------------------------------
def references(config: DemoConfig, grid: Path, resolutions: Sequence[int], data: dict, device) -> dict:
    """The rows every student is measured against: the HR teacher (at HR and at each resolution), the
    generative teacher's encoder features at each resolution, the LR face's pixels, and an untrained student."""
    teacher, _, encoder = load_teachers(config, grid, int(data["train"].targets.max()) + 1)
    seed_everything(config.seed)
    untrained = SmallFaceNet(config.width, config.image_size, config.embedding_dim).eval()
    rows = {f"HR teacher ({config.image_size}x{config.image_size})": {
        "hr": evaluate(teacher, data, None, device, "HR teacher")}}
    for name, model, feats in (("HR teacher on LR input", teacher, None),
                               (TG_ROW, encoder, "tg"),
                               (PIXELS_ROW, None, "pixels"),
                               (RANDOM_ROW, untrained, None)):
        rows[name] = {}
        for r in resolutions:
            if feats == "tg":
                rows[name][r] = evaluate(teacher_feature(encoder, r), data, None, device, name)
            elif feats == "pixels":  # what T_g's features must beat to add identity to their own input
                rows[name][r] = evaluate(lambda x: x.flatten(1), data, lambda x, r=r: degrade(x, r, size=r), device,
                                         name)
            else:
                rows[name][r] = evaluate(model, data, lambda x, r=r: degrade(x, r), device, name)
    return rows


def references_job(spec: dict, report: Callable[..., None] | None = None) -> dict:
    """references() in a grid process, beside the last cells instead of after them: with the main process's
    thread count (spec["threads"]), so its numbers are those the main process would compute."""
    previous = torch.get_num_threads()
    torch.set_num_threads(spec["threads"])
    try:
        config, grid = from_dict(DemoConfig, spec["config"]), Path(spec["grid_dir"])
        start = time.perf_counter()
        data = load_cell_data(config, spec.get("train_root"), spec.get("pairs"), data_cache_dir(grid))
        rows = references(config, grid, spec["resolutions"], data, Runtime.create(spec.get("device", "cpu")).device)
        return {"rows": rows, "seconds": time.perf_counter() - start}
    finally:
        torch.set_num_threads(previous)


def _mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(values) > 1 else float("nan")


def summarize(results: list[dict], refs: dict, variants: Sequence[str], resolutions: Sequence[int]) -> dict:
    """Per (variant, resolution): mean and std (ddof=1) over seeds of every metric."""
    table = {}
    for v in variants:
        for r in resolutions:
            cells = [c for c in results if c["variant"] == v and c["resolution"] == r]
            if not cells:
                continue
            row = {"variant": v, "resolution": r, "seeds": sorted(c["seed"] for c in cells)}
            for metric in METRICS:
                values = [c["metrics"][metric] for c in cells if metric in c["metrics"]]
                if values:
                    row[metric] = dict(zip(("mean", "std"), _mean_std(values)), values=values)
            table[f"{v}@{r}"] = row
    return {"students": table, "references": refs}


def _pm(entry: dict | None) -> str:
    if not entry:
        return "-"
    std = entry["std"]
    return f"{100 * entry['mean']:.2f} +- {100 * std:.2f}" if std == std else f"{100 * entry['mean']:.2f}"


def _ref_cell(metrics: dict | None, metric: str) -> str:
    return f"{100 * metrics[metric]:.2f}" if metrics and metric in metrics else "-"


def ablation_markdown(summary: dict, note: str, title: str, footer: Sequence[str] = ()) -> str:
    fars = {m["far_level"] for per in summary["references"].values() for m in per.values() if m and "far_level" in m}
    labels = dict(METRICS, tar=f"TAR@FAR={fars.pop():.2g} %" if len(fars) == 1 else METRICS["tar"])
    rows = []
    for row in summary["students"].values():
        rows.append({"model": row["variant"], "input": f"{row['resolution']}x{row['resolution']}",
                     "seeds": len(row["seeds"]), **{label: _pm(row.get(m)) for m, label in labels.items()}})
    for name, per_res in summary["references"].items():
        for r, metrics in per_res.items():
            rows.append({"model": name, "input": "HR" if r == "hr" else f"{r}x{r}", "seeds": "-",
                         **{label: _ref_cell(metrics, m) for m, label in labels.items()}})
    lines = [f"# {title}", "", f"**{note}**", "", markdown_table(rows), "",
             "Students: mean +- std (ddof=1) over seeds. Verification: LFW protocol (10 contiguous folds). Probe: a "
             "linear softmax classifier on frozen features, fitted on half of each unseen test identity's images, "
             "tested on the other half (stage1-probe: the stage-1 backbone's flattened feature map; the generative "
             "teacher: its flattened encoder feature of the LR face). Reference rows: one run each.", *footer]
    return "\n".join(lines) + "\n"


def plot_ablation(path: Path, summary: dict, title: str) -> Path:
    import matplotlib
    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    students = list(summary["students"].values())
    variants = list(dict.fromkeys(r["variant"] for r in students))
    resolutions = list(dict.fromkeys(r["resolution"] for r in students))
    metrics = [m for m in ("accuracy", "probe") if any(m in r for r in students)]
    fig = Figure(figsize=(5.5 * len(metrics), 3.8), dpi=100)
    width = 0.8 / max(1, len(resolutions))
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        lows = [100.0]
        for j, r in enumerate(resolutions):
            means, stds = [], []
            for v in variants:
                entry = summary["students"].get(f"{v}@{r}", {}).get(metric)
                means.append(100 * entry["mean"] if entry else float("nan"))
                stds.append(100 * entry["std"] if entry and entry["std"] == entry["std"] else 0.0)
            lows += [m - s for m, s in zip(means, stds) if m == m]
            xs = [i + (j - (len(resolutions) - 1) / 2) * width for i in range(len(variants))]
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=f"{r}x{r}")
        tg = summary["references"].get(TG_ROW, {})
        for j, r in enumerate(resolutions):
            if metric in tg.get(r, {}):
                ax.axhline(100 * tg[r][metric], ls="--", lw=1, color=f"C{j}", alpha=0.7)
                lows.append(100 * tg[r][metric])
        ax.set_xticks(range(len(variants)), variants, rotation=30, fontsize=8)
        ax.set_ylabel(METRICS[metric])
        ax.set_title(f"{METRICS[metric]}, mean +- std over seeds (dashed: T_g's features)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_ylim(max(0.0, min(lows) - 5), 100)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_png(fig, path)


def recipe_hash(config: dict, train_root, pairs) -> str:
    """What a grid's cells and reference rows are computed from: the recipe and the data. The recipe's
    ablation.build_spread is left out: it says how the table is read, not how it is made."""
    made = {**config, "ablation": {k: v for k, v in config.get("ablation", {}).items() if k != "build_spread"}}
    return hashlib.sha256(json.dumps([made, train_root, pairs], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _same_refs_key(saved: dict | None, key: dict, accepted: set[str]) -> bool:
    return saved is not None and saved.get("spec_hash") in accepted and saved | {"spec_hash": key["spec_hash"]} == key


def default_jobs(threads: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, threads))


def run_grid(out_dir: str | Path, config: DemoConfig, variants: Sequence[str], resolutions: Sequence[int],
             seeds: int | Sequence[int], train_root: str | None = None, pairs: str | None = None, device: str = "cpu",
             jobs: int = 0, threads: int = 1, progress: bool = True,
             after_cell: dict[str, tuple[str, dict]] | None = None) -> dict:
    """Run (or resume) the grid and write ablation.md, ablation.json and ablation.png; returns the summary.
    after_cell: {cell_dir: ("module:function", spec)}, a task to run in a grid process once that cell is
    trained (when the grid runs it in processes); its result is in the returned dict's "after_cell"."""
    start = time.perf_counter()
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"variants must be among {VARIANTS}, got {list(variants)}")
    if not resolutions or any(isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= config.image_size
                              for r in resolutions):
        raise ValueError(f"resolutions must be ints in [1, {config.image_size}], got {list(resolutions)}")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise ValueError(f"seeds must be >= 1, got {seeds!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.create(device)
    handler = log_to_file(out / "ablate.log", runtime)
    try:
        base = to_dict(config)
        spec_hash = recipe_hash(base, train_root, pairs)
        accepted = {spec_hash}  # the hashes of cells and reference rows this grid reuses
        stamp = out / "grid.json"
        if stamp.is_file():
            stored = json.loads(stamp.read_text())
            if recipe_hash(stored["config"], stored.get("train_root"), stored.get("pairs")) != spec_hash:
                raise ValueError(f"{out} holds a grid of another recipe or data; choose another output folder")
            accepted.add(stored["spec_hash"])  # stamped when the hash still covered ablation.build_spread
        write_json(stamp, {"spec_hash": spec_hash, "config": base, "train_root": train_root, "pairs": pairs})
        seed_everything(config.seed)
        data = load_cell_data(config, train_root, pairs, data_cache_dir(out))
        note = data_note(data)
        log.info("%s", note)
        specs, done, order = [], {}, []
        for r in resolutions:
            for seed in seed_list:
                for v in variants:
                    cell = out / "cells" / cell_name(v, r, seed)
                    order.append(str(cell))
                    result = cell / "result.json"
                    reused = json.loads(result.read_text()) if result.is_file() else {}
                    if reused.get("spec_hash") in accepted:
                        if reused["spec_hash"] != spec_hash:  # a cell of a grid stamped under the old hash
                            reused["spec_hash"] = spec_hash
                            write_json(result, reused)
                        done[str(cell)] = reused
                        continue
                    specs.append({"config": to_dict(cell_config(config, r, seed)), "variant": v, "cell_dir": str(cell),
                                  "grid_dir": str(out), "train_root": train_root, "pairs": pairs, "device": device,
                                  "threads": threads, "spec_hash": spec_hash})
        jobs = min(jobs or default_jobs(threads), max(1, len(specs)))
        # with several processes the denoiser trains in one of them while the others run the cells without T_g
        denoiser_job = None
        if jobs > 1 and not teacher_paths(out)["denoiser"].is_file():
            denoiser_job = {"config": base, "grid_dir": str(out), "train_root": train_root, "pairs": pairs,
                            "device": device, "threads": threads, "resolutions": list(resolutions)}
        refs, reports = None, {}
        teachers = train_teachers(config, out, data["train"], runtime, progress,
                                  which=("hr",) if denoiser_job else ("hr", "denoiser"))
        if denoiser_job is None and specs:  # else the denoiser's process caches once it is trained
            teachers["timings"] |= cache_teacher_outputs(config, out, data["train"], resolutions)["timings"]
        log.info("grid: %d cells to run (%d done before), %d process(es) x %d thread(s)", len(specs), len(done),
                 jobs, threads)
        bar = tqdm(total=len(specs), desc="ablation cells", unit="cell", disable=not progress, dynamic_ncols=True)
        if jobs == 1:
            for spec in specs:
                done[spec["cell_dir"]] = run_cell(spec | {"progress": progress})
                bar.update()
        else:
            refs_job = {"config": base, "grid_dir": str(out), "train_root": train_root, "pairs": pairs,
                        "device": device, "resolutions": list(resolutions), "threads": torch.get_num_threads(),
                        "cost": REFERENCES_COST}
            reports = _run_in_processes(specs, denoiser_job, jobs, threads, done, bar, progress, refs_job,
                                        after_cell or {})
            denoiser, refs = reports.get("denoiser"), reports.get("references")
            if refs is not None:
                log.info("reference rows (in a grid process): %.1fs", refs["seconds"])
            if denoiser is not None:
                log.info("denoiser (in a grid process): %.1fs", denoiser["timings"]["denoiser"])
                for key in ("histories", "timings"):
                    teachers[key] |= denoiser[key]
        bar.close()
        results = [done[cell] for cell in order]  # grid order, however the processes finished
        teacher_files = {name: {"weights": str(path), "sha256": file_sha256(path)}
                         for name, path in teacher_paths(out).items()}
        for name, entry in teacher_files.items():  # trained by this grid: allow_random_teachers says so
            log.info("teacher %s: %s sha256 %s", name, entry["weights"], entry["sha256"])
        # the reference rows depend on the recipe and the teachers only: a rerun reads them back
        refs_key = {"spec_hash": spec_hash, "resolutions": list(resolutions),
                    "teachers": {name: entry["sha256"] for name, entry in teacher_files.items()}}
        saved_refs = out / "references.json"
        if refs is not None:
            refs = refs["rows"]
        elif saved_refs.is_file() and _same_refs_key(json.loads(saved_refs.read_text()).get("key"), refs_key, accepted):
            refs = {name: {r if r == "hr" else int(r): m for r, m in rows.items()}
                    for name, rows in json.loads(saved_refs.read_text())["rows"].items()}
            log.info("reference rows: read back from %s", saved_refs)
        else:
            refs = references(config, out, resolutions, data, runtime.device)
        write_json(saved_refs, {"key": refs_key, "rows": refs})
        summary = summarize(results, refs, variants, resolutions)
        elapsed = time.perf_counter() - start
        machine = machine_state()
        summary |= {"note": note, "dataset": data["name"], "elapsed_s": elapsed, "jobs": jobs, "threads": threads,
                    "machine": machine, "teacher_timings_s": teachers["timings"],
                    "teachers": teacher_files,
                    "cells": [{k: v for k, v in c.items() if k != "history"} for c in results]}
        title = f"Ablation on {data['name']}"
        footer = ["", f"Teachers trained once from seed {config.seed}; the seeds {seed_list} vary each student's "
                      f"initialisation, batch order and draws. Students train {config.student_budget.steps} steps "
                      f"(GDRD: {config.stage1.steps} stage 1 + {config.stage2.optim.steps} stage 2).",
                  f"Wall time {elapsed:.0f} s with {jobs} process(es) x {threads} thread(s) on {machine}."]
        paths = {"markdown": out / "ablation.md", "json": out / "ablation.json", "figure": out / "ablation.png",
                 "log": out / "ablate.log"}
        markdown = ablation_markdown(summary, note, title, footer)
        paths["markdown"].write_text(markdown)
        write_json(paths["json"], summary)
        plot_ablation(paths["figure"], summary, title)
        log.info("ablation\n%s", markdown)
        return summary | {"markdown": markdown, "paths": paths, "histories": teachers["histories"],
                          "after_cell": reports.get("after_cell", {})}
    finally:
        if handler is not None:
            logging.getLogger("gdrd_fast").removeHandler(handler)


# a cell's relative cost on CPU, per step (teacher cache on): the grid starts the costliest cells first, so
# that no process is left alone with a long cell at the end (roughly, from the demo's cells on 2 x 1 thread)
CELL_COST = {"baseline": 1.0, "stage1-probe": 0.5, "gdrd": 0.8, "gdrd-unfrozen": 1.2, "crd": 1.3, "crrcd": 1.5,
             "gdrd-e2e": 1.5}


REFERENCES_COST = 300.0  # the reference rows (references_job): about half a cell


def cell_cost(spec: dict) -> float:
    """A cell's expected time, in units of a baseline step: its steps x its variant's cost per step (a task
    that is not a cell says its own: spec["cost"])."""
    if "cost" in spec:
        return spec["cost"]
    config = spec["config"]
    return CELL_COST.get(spec["variant"], 1.5) * (config["stage1"]["steps"] + config["stage2"]["optim"]["steps"])


def by_cost(tasks: list[tuple]) -> list[tuple]:
    """The queue, costliest task first (longest processing time first); the denoiser (no variant, no cost:
    the cells that need T_g wait for it) stays ahead of them all. Stable: equal costs keep their order."""
    return sorted(tasks, key=lambda t: -cell_cost(t[2]) if "variant" in t[2] or "cost" in t[2] else -float("inf"))


def _run_in_processes(specs: list[dict], denoiser_job: dict | None, jobs: int, threads: int, done: dict, bar,
                      progress: bool, refs_job: dict | None = None, after_cell: dict | None = None) -> dict:
    """Run the cells in `jobs` worker processes (results into done[cell_dir]); with denoiser_job, train the
    denoiser first in one of them and start the cells that need T_g once it is saved. Each running task
    shows its steps and ETA on a bar of its own. With refs_job, the reference rows are computed in a worker
    too (once the denoiser is saved), beside the cells. Returns {"denoiser": its report, "references": ...}
    for those that ran."""
    waits = [denoiser_job is not None and s["variant"] in GENERATIVE_VARIANTS for s in specs]
    waiting = [(s["cell_dir"], "gdrd_fast.demo.ablate:run_cell", s) for s, w in zip(specs, waits) if w]
    tasks = [(s["cell_dir"], "gdrd_fast.demo.ablate:run_cell", s) for s, w in zip(specs, waits) if not w]
    if refs_job is not None:  # it needs both teachers
        (waiting if denoiser_job is not None else tasks).append(("references", __name__ + ":references_job",
                                                                 refs_job))
    tasks = by_cost(tasks)
    if denoiser_job is not None:
        tasks.insert(0, (None, "gdrd_fast.demo.teachers:train_denoiser_job", denoiser_job))
    bars = [tqdm(total=1, position=i + 1, leave=False, disable=not progress, dynamic_ncols=True, unit="step",
                 desc=f"grid process {i + 1}: starting") for i in range(jobs)]
    report, showing = {}, [None] * jobs

    def on_progress(worker: int, key, p: dict) -> None:
        label = "denoiser" if key is None else Path(key).name if isinstance(key, str) else key[0]
        line, name = bars[worker], f"{label} {p['stage']}"
        if showing[worker] != (name, p["total"]):  # a new task or stage: its rate and ETA start afresh
            showing[worker] = (name, p["total"])
            line.set_description(name, refresh=False)
            line.initial = 0  # reset() redraws: no rate from the last task's start
            line.reset(total=p["total"])
            line.initial = line.n = line.last_print_n = p["step"]  # a resumed cell starts where it was
        line.update(p["step"] - line.n)

    def on_done(key, result) -> list[tuple]:
        if key is None:
            report["denoiser"] = result
            return waiting
        if key == "references":
            report["references"] = result
            return []
        if isinstance(key, tuple):  # ("after", cell_dir)
            report.setdefault("after_cell", {})[key[1]] = result
            return []
        done[key] = result
        bar.update()
        return [(("after", key), *after_cell[key])] if after_cell and key in after_cell else []

    try:
        with Pool(jobs, threads) as pool:
            pool.run(tasks, on_done, on_progress, order=by_cost)
    finally:
        for line in bars:
            line.close()
    return report


def machine_state() -> str:
    """Cores, load average and torch threads: what a wall time means on a shared machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return f"{cores} CPU core(s), load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} (1/5/15 min) at the end"

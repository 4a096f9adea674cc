"""`gdrd-fast train --dry-run`: what a run builds and reads, and what one step of each stage costs.

It runs the preflight checks, opens the data, builds the student and every stage of the variant (every
weights file loaded), reads batches and runs two steps per stage, timing the second (the first pays for
warm-up). It reports the peak memory and the time per step, and writes nothing to output_dir.
"""
from __future__ import annotations

import dataclasses
import logging
import resource
import sys
import time

import torch
from torch.utils.data import Dataset

from .. import models
from .checks import check_config, check_parts
from .config import TrainConfig
from .pipeline import make_trainer, paper_parts, plan_for
from .runtime import Runtime, seed_everything
from .teacher_cache import TeacherCache

log = logging.getLogger("gdrd_fast.train")


def _peak_rss_gib(who: int) -> float:
    """Peak resident memory of this process (RUSAGE_SELF) or of its largest finished child (RUSAGE_CHILDREN)."""
    kib = resource.getrusage(who).ru_maxrss  # KiB on Linux, bytes on macOS
    return kib / (2 ** 30 if sys.platform == "darwin" else 2 ** 20)


def dry_run(config: TrainConfig, dataset: Dataset | None = None) -> dict:
    """Every stage built and stepped twice; returns {stages: {name: {seconds_per_step, peak_rss_gib}},
    peak_rss_gib, worker_peak_rss_gib, estimate_gib, cuda_peak_gib, batch_size, num_workers}."""
    from ..data import open_dataset
    check_config(config, need_data=dataset is None)
    runtime = Runtime.create(config.device, config.amp)
    seed_everything(config.seed)
    if dataset is None:
        dataset = open_dataset(config.data.train_root, config.data.image_size, as_uint8=True)
    num_classes = int(max(dataset.targets)) + 1
    student = models.build_student(config.models.student)
    parts = paper_parts(config, runtime, student, num_classes, len(dataset))
    plan = plan_for(config, parts)
    check_parts(config, parts, [p.name for p in plan])
    quiet = dataclasses.replace(config, checkpoint_every=0, log_every=0)  # nothing saved, nothing logged
    cache = TeacherCache(config.data.teacher_cache) if config.data.teacher_cache is not None else None
    stages = {}
    for planned in plan:
        trainer = make_trainer(planned, dataset, runtime, quiet, cache)
        trainer.progress = False
        trainer.train_steps(1)  # warm-up: the first batch, allocator and kernel choices
        timed = min(1, trainer.total_steps - trainer.step)
        start = time.perf_counter()
        trainer.train_steps(timed)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        seconds = (time.perf_counter() - start) / timed if timed else float("nan")
        stages[planned.name] = {"seconds_per_step": seconds, "peak_rss_gib": _peak_rss_gib(resource.RUSAGE_SELF)}
        del trainer
    workers = config.data.num_workers
    report = {"stages": stages, "batch_size": config.data.batch_size, "num_workers": workers,
              "peak_rss_gib": _peak_rss_gib(resource.RUSAGE_SELF),
              "worker_peak_rss_gib": _peak_rss_gib(resource.RUSAGE_CHILDREN) if workers else 0.0,
              "cuda_peak_gib": (torch.cuda.max_memory_allocated(runtime.device) / 2 ** 30
                                if runtime.device.type == "cuda" else None)}
    # a data worker's RSS counts the pages it shares with the main process: an upper estimate
    report["estimate_gib"] = report["peak_rss_gib"] + workers * report["worker_peak_rss_gib"]
    return report


def format_report(report: dict) -> str:
    lines = [f"dry run at batch {report['batch_size']}, {report['num_workers']} data worker(s):"]
    for name, stage in report["stages"].items():
        lines.append(f"  {name}: {stage['seconds_per_step']:.2f} s per step (peak RSS so far "
                     f"{stage['peak_rss_gib']:.2f} GiB)")
    lines.append(f"  peak RSS {report['peak_rss_gib']:.2f} GiB in the main process"
                 + (f" + {report['num_workers']} x {report['worker_peak_rss_gib']:.2f} GiB per data worker "
                    f"(an upper bound: shared pages count in each)" if report["num_workers"] else "")
                 + f"; estimate {report['estimate_gib']:.2f} GiB")
    if report["cuda_peak_gib"] is not None:
        lines.append(f"  CUDA peak allocated {report['cuda_peak_gib']:.2f} GiB")
    return "\n".join(lines)

"""Seconds per training step with the live frozen teachers against the teacher cache, in one run (#23).

    python -m benchmarks.teacher_cache_steps [--batch 4] [--steps 2] [--out benchmarks/results]

Paper: the paper recipe (gdrd_fast/configs/paper.yaml: IResNet-18 student, PGDiff encoder at 448, IResNet-50
T_d, amp bf16) on a small synthetic RecordIO pack, as a new user runs it; the teachers' random weights are
saved to files first (random teachers drawn anew would not match any cache), and the cache is written by
`pipeline.cache_teachers`, the code of `gdrd-fast cache-teachers`. Demo: the demo recipe's cells
(gdrd_fast/configs/demo.yaml at its full size) at one torch thread, as a grid process runs them.
Each stage is timed live, then cached, then live and cached again, each after one warm-up step, so both
arms see the same load; the ratio is live / cached. Results go to teacher_cache_steps_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gdrd_fast import models
from gdrd_fast.data import pack_folder, write_synthetic_dataset
from gdrd_fast.train import Runtime, Trainer, load_config
from gdrd_fast.train import teacher_cache as tc
from gdrd_fast.train.pipeline import Parts, cache_teachers, make_trainer, paper_parts, plan_for, variant_plan


def seconds_per_step(trainer: Trainer, steps: int) -> float:
    trainer.progress = False
    trainer.train_steps(1)  # warm-up: first batch, allocator, kernel choices
    start = time.perf_counter()
    trainer.train_steps(steps)
    return (time.perf_counter() - start) / steps


def compare(build, steps: int, rounds: int = 2) -> dict:
    """build(cached: bool) -> Trainer; live and cached alternate `rounds` times."""
    times = {"live": [], "cached": []}
    for _ in range(rounds):
        for arm in times:
            times[arm].append(seconds_per_step(build(arm == "cached"), steps))
    live, cached = statistics.median(times["live"]), statistics.median(times["cached"])
    return {"live_s": live, "cached_s": cached, "ratio": live / cached, "samples": times}


def paper(tmp: Path, batch: int, steps: int) -> dict:
    data = write_synthetic_dataset(tmp / "data", num_train_identities=2, images_per_identity=batch * 2,
                                   num_test_identities=20, test_images_per_identity=2, pairs_per_fold=2)
    rec, _ = pack_folder(data["train"], tmp / "train.rec", progress=False)
    weights = {"td": models.build_discriminative_teacher("r50"), "tg": models.build_generative_teacher("pgdiff"),
               "head": models.ArcFaceHead(512, 2)}
    for name, module in weights.items():
        torch.save(module.state_dict(), tmp / f"{name}.pt")
    config = load_config("paper", [
        f"data.train_root={rec}", f"data.batch_size={batch}", "data.num_workers=0", "device=cpu",
        f"models.discriminative_teacher_weights={tmp / 'td.pt'}", f"models.discriminative_teacher_head={tmp / 'head.pt'}",
        f"models.generative_teacher_weights={tmp / 'tg.pt'}", f"data.teacher_cache={tmp / 'cache'}",
        f"output_dir={tmp / 'run'}", "checkpoint_every=0", "log_every=0"])
    start = time.perf_counter()
    manifest = cache_teachers(config, "bf16", progress=False)
    cache_s = time.perf_counter() - start
    from gdrd_fast.data import open_dataset
    dataset = open_dataset(rec, 112, as_uint8=True)
    runtime = Runtime.create("cpu", config.amp)
    cache = tc.TeacherCache(config.data.teacher_cache)
    results = {}
    for index, name in enumerate(["stage1", "stage2"]):
        def build(cached: bool, index: int = index):
            student = models.build_student(config.models.student)
            planned = plan_for(config, paper_parts(config, runtime, student, 2, len(dataset)))[index]
            return make_trainer(planned, dataset, runtime, config, cache if cached else None)
        results[name] = compare(build, steps)
        print(name, {k: v for k, v in results[name].items() if k != "samples"}, flush=True)
    return {"batch": batch, "images": len(dataset), "amp": config.amp, "threads": torch.get_num_threads(),
            "cache_build_s": cache_s, "cache_error": manifest["error"], "stages": results}


def demo(tmp: Path, steps: int) -> dict:
    from gdrd_fast.data import SyntheticFaces
    from gdrd_fast.demo.config import load_demo_config
    from gdrd_fast.demo.nets import SmallFaceNet
    torch.set_num_threads(1)  # as a demo grid process runs
    c = load_demo_config("demo")
    d = c.data
    train = SyntheticFaces(d.train_identities, d.images_per_identity, c.seed, c.image_size)
    runtime, classes = Runtime.create("cpu"), d.train_identities
    encoder = models.DiffusionEncoder(models.build_unet(dict(c.denoiser.unet)).eval(), c.denoiser.tap,
                                      input_size=c.denoiser.image_size).eval()
    teacher = SmallFaceNet(c.width, c.image_size, c.embedding_dim).eval()
    teacher_head = models.ArcFaceHead(c.embedding_dim, classes, c.stage2.arcface_scale, c.stage2.arcface_margin)

    def plan(variant: str):
        net = SmallFaceNet(c.width, c.image_size, c.embedding_dim)
        parts = Parts(runtime, net.backbone, net.head,
                      lambda: models.ArcFaceHead(c.embedding_dim, classes, c.stage2.arcface_scale,
                                                 c.stage2.arcface_margin),
                      lambda: (teacher, teacher_head), lambda: encoder, len(train), c.embedding_dim, c.backend,
                      c.denoiser.image_size, c.denoiser.timestep, c.denoiser.noise)
        return variant_plan(variant, parts, c.stage1, c.stage2, c.student_budget)

    views = dict(resolution=c.resolution, flip=True, interpolation="bilinear", antialias=True)
    start = time.perf_counter()
    tc.build_cache(tmp / "demo_cache", tc.stage_outputs(plan("gdrd-e2e")[0].build(), views), train, views,
                   "bf16", progress=False)
    cache_s = time.perf_counter() - start
    cache = tc.TeacherCache(tmp / "demo_cache")
    results = {}
    for variant, index in (("gdrd", 0), ("gdrd", 1), ("gdrd-e2e", 0), ("crrcd", 0), ("crd", 0)):
        def build(cached: bool, variant: str = variant, index: int = index):
            planned = plan(variant)[index]
            return Trainer(planned.build(), train, runtime, planned.optim, batch_size=c.batch_size, seed=0,
                           resolution=c.resolution, progress=False, group_optims=planned.group_optims,
                           teacher_cache=cache if cached else None)
        name = f"{variant} {plan(variant)[index].name}"
        results[name] = compare(build, steps)
        print(name, {k: v for k, v in results[name].items() if k != "samples"}, flush=True)
    return {"batch": c.batch_size, "images": len(train), "threads": 1, "cache_build_s": cache_s, "cells": results}


def markdown(result: dict) -> str:
    p, dm = result["paper"], result["demo"]
    lines = [f"# Training steps with the live teachers against the teacher cache ({result['machine']})", "",
             f"torch {result['torch']}, {result['date']}; load average {result['load_before']} before, "
             f"{result['load_after']} after (1/5/15 min; the machine is shared, so compare ratios within this "
             "run only). Medians of 2 alternating rounds per arm, each of "
             f"{result['steps']} (paper) / {result['demo_steps']} (demo) steps after a warm-up step.", "",
             f"## Paper recipe (amp {p['amp']}, batch {p['batch']}, {p['threads']} threads, synthetic RecordIO "
             f"pack of {p['images']} images)", "",
             "| stage | live s/step | cached s/step | live / cached |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['live_s']:.2f} | {s['cached_s']:.2f} | {s['ratio']:.2f}x |"
              for name, s in p["stages"].items()]
    lines += ["", f"Writing the bf16 cache (both teachers, {p['images']} images x 2 flips): {p['cache_build_s']:.1f} s. "
              "Its error against the float32 teachers: " + "; ".join(
                  f"{k}: max abs {e['max_abs']:.3g}, relative {e['relative']:.3g}" for k, e in p["cache_error"].items()),
              "", f"## Demo recipe cells (batch {dm['batch']}, 1 thread, {dm['images']} images)", "",
              "| cell stage | live s/step | cached s/step | live / cached |", "|---|---|---|---|"]
    lines += [f"| {name} | {s['live_s']:.4f} | {s['cached_s']:.4f} | {s['ratio']:.2f}x |"
              for name, s in dm["cells"].items()]
    lines += ["", f"Writing the demo's cache (T_g tap and T_d embedding, bf16): {dm['cache_build_s']:.1f} s.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4, help="the paper recipe's batch (paper: 96)")
    parser.add_argument("--steps", type=int, default=2, help="timed paper steps per round")
    parser.add_argument("--demo-steps", type=int, default=10, help="timed demo steps per round")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    machine = f"{platform.machine()}-{os.cpu_count()}-cores"
    result = {"machine": machine, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "load_before": " / ".join(f"{x:.2f}" for x in os.getloadavg()), "steps": args.steps,
              "demo_steps": args.demo_steps}
    with tempfile.TemporaryDirectory() as tmp:
        result["paper"] = paper(Path(tmp), args.batch, args.steps)
        result["demo"] = demo(Path(tmp), args.demo_steps)
    result["load_after"] = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    stem = args.out / f"teacher_cache_steps_{machine}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

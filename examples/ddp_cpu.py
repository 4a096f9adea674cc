"""Distributed GDRD training on CPU: 2 processes, gloo, SYNTHETIC faces, a few minutes at most.

    torchrun --nproc_per_node=2 examples/ddp_cpu.py --out runs/ddp_cpu
    torchrun --nproc_per_node=2 examples/ddp_cpu.py --out runs/ddp_cpu --resume runs/ddp_cpu/stage2.pt

An HR ArcFace teacher trains first, then a 16x16 student with KD + relational contrastive
distillation (or CRD with --distill crd). --batch is the GLOBAL batch: each of the N processes takes
1/N of it, and the run equals one process fed the whole batch (BatchNorm aside: CPU has no
SyncBatchNorm). Rank 0 alone logs (<out>/train.log) and writes checkpoints; at the end every rank
checks that its queues / banks are bit-identical to rank 0's. Also runs as one plain process.
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist

from gdrd_fast.data import SyntheticFaces
from gdrd_fast.distributed.launch import shutdown
from gdrd_fast.demo.nets import SmallFaceNet
from gdrd_fast.models import ArcFaceHead
from gdrd_fast.train import DiscriminativeStage, OptimConfig, Runtime, Trainer, log_to_file, seed_everything
from gdrd_fast.train.config import Stage2Config
from gdrd_fast.train.pipeline import make_distill

IMAGE, EMBEDDING, WIDTH = 32, 64, 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/ddp_cpu")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per stage")
    parser.add_argument("--batch", type=int, default=32, help="global batch (divisible by the process count)")
    parser.add_argument("--distill", choices=("rcd", "crd"), default="rcd")
    parser.add_argument("--resume", help="a stage2.pt written by an earlier run (skips the teacher's training)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    runtime = Runtime.create("cpu")  # under torchrun: joins the gloo group, rank / world_size set
    out = Path(args.out)
    log_to_file(out / "train.log", runtime)
    log = logging.getLogger("gdrd_fast.example")
    seed_everything(0)  # the same on every rank: identical initial weights and random draws
    faces = SyntheticFaces(24, 8, seed=0, image_size=IMAGE)
    classes = int(faces.targets.max()) + 1
    optim = OptimConfig(lr=0.1, epochs=2, milestones=[1], steps=args.steps)
    common = dict(batch_size=args.batch, seed=0, log_every=10)
    log.info("SYNTHETIC faces: %d images, %d identities; %d process(es), global batch %d",
             len(faces), classes, runtime.world_size, args.batch)

    teacher, teacher_head = SmallFaceNet(WIDTH, IMAGE, EMBEDDING), ArcFaceHead(EMBEDDING, classes, 32.0, 0.3)
    student, student_head = SmallFaceNet(WIDTH, IMAGE, EMBEDDING), ArcFaceHead(EMBEDDING, classes, 32.0, 0.3)
    stage2_recipe = Stage2Config(distill=args.distill)
    stage2_recipe.rcd.rel_dim, stage2_recipe.rcd.num_negatives, stage2_recipe.rcd.queue_size = 32, 32, 128
    stage2_recipe.crd.feat_dim, stage2_recipe.crd.nce_k = 32, 64
    distill = make_distill(stage2_recipe, len(faces), EMBEDDING)

    if args.resume is None:  # the checkpoint of stage 2 holds the teacher too
        hr = DiscriminativeStage(runtime, teacher.backbone, teacher.head, teacher_head, train_backbone=True,
                                 input="hr", kd_weight=0.0)
        log.info("teacher: %s", Trainer(hr, faces, runtime, optim, resolution=None, **common).train_steps())
    # rank 0 writes <out>/stage2.pt every 10 steps and at the end
    lr = DiscriminativeStage(runtime, student.backbone, student.head, student_head, train_backbone=True,
                             teacher=teacher, teacher_classifier=teacher_head, distill=distill)
    trainer = Trainer(lr, faces, runtime, optim, resolution=16, output_dir=out, checkpoint_every=10, **common)
    if args.resume is not None:
        trainer.resume(args.resume)
        log.info("resumed from %s at step %d", args.resume, trainer.step)
    log.info("student: %s", trainer.train_steps())
    path = trainer.save()
    if path is not None:
        log.info("saved %s", path)

    if runtime.world_size > 1:  # the fix for pytorch-metric-learning#639: no drift across ranks
        for name, buffer in trainer.stage.distill.named_buffers():
            reference = buffer.clone()
            dist.broadcast(reference, src=0)
            if not torch.equal(reference, buffer):
                raise RuntimeError(f"rank {runtime.rank}: distill.{name} differs from rank 0's")
        log.info("distill buffers (%s) bit-identical on all %d ranks",
                 ", ".join(n for n, _ in trainer.stage.distill.named_buffers()), runtime.world_size)
    shutdown()


if __name__ == "__main__":
    if os.environ.get("RANK", "0") == "0":  # rank-0-only console logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()

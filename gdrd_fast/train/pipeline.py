"""A recipe (TrainConfig) turned into the two GDRD stages on a training set (identity folders or .rec), and run.

Stage 1 writes <output_dir>/stage1.pt, stage 2 writes stage2.pt, and the trained student is saved as a
plain IResNet state dict (insightface keys) in student.pt, ready for `gdrd-fast eval`.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .. import models
from ..losses import CRDLoss, FeatureRegressionLoss, RelationalContrastiveLoss
from . import checkpoint as ckpt
from .config import Stage2Config, TrainConfig, to_dict
from .loop import Trainer, log_to_file
from .runtime import Runtime, seed_everything
from .validation import ScalarLogger, Validator
from .stages import DiscriminativeStage, GenerativeStage

log = logging.getLogger("gdrd_fast.train")


def make_distill(stage2: Stage2Config, n_data: int, embedding_dim: int, backend: str = "auto"):
    """The stage-2 contrastive term: RelationalContrastiveLoss (GDRD), CRDLoss, or None."""
    if stage2.distill == "rcd":
        r = stage2.rcd
        return RelationalContrastiveLoss(embedding_dim, r.rel_dim, r.num_negatives, r.queue_size, r.temperature,
                                         n_data=n_data, supervised=r.supervised, backend=backend)
    if stage2.distill == "crd":
        c = stage2.crd
        return CRDLoss(embedding_dim, embedding_dim, n_data, c.feat_dim, c.nce_k, c.nce_t, c.nce_m, backend=backend)
    return None


def make_trainer(stage, dataset: Dataset, runtime: Runtime, config: TrainConfig, optim, **hooks) -> Trainer:
    """hooks: Trainer's scalars= and step_hooks=."""
    d = config.data
    return Trainer(stage, dataset, runtime, optim, **hooks, batch_size=d.batch_size, seed=config.seed,
                   resolution=d.resolution, flip=d.flip, interpolation=d.interpolation, antialias=d.antialias,
                   num_workers=d.num_workers, output_dir=config.output_dir, log_every=config.log_every,
                   checkpoint_every=config.checkpoint_every, group_optims={"distill": config.stage2.distill_optim},
                   shard_banks=config.stage2.crd.sharded, sync_batchnorm=config.sync_batchnorm)


def build_stage1(config: TrainConfig, runtime: Runtime, student: models.Student) -> GenerativeStage:
    m = config.models
    teacher_config = m.generative_teacher_config if m.generative_teacher == "diffusers" else None
    teacher = models.build_generative_teacher(m.generative_teacher, teacher_config, m.generative_teacher_weights,
                                              m.generative_teacher_tap)
    regression = FeatureRegressionLoss(student.backbone.out_channels, teacher.out_channels, backend=config.backend)
    return GenerativeStage(runtime, student.backbone, teacher, regression, m.generative_teacher_input)


def build_stage2(config: TrainConfig, runtime: Runtime, student: models.Student, num_classes: int,
                 n_data: int) -> DiscriminativeStage:
    m, s2 = config.models, config.stage2
    teacher = models.build_discriminative_teacher(m.discriminative_teacher, m.discriminative_teacher_weights)
    teacher_head = None
    if s2.kd_weight:
        if m.discriminative_teacher_head is None:
            raise ValueError("stage2.kd_weight > 0 needs models.discriminative_teacher_head: a state dict with the "
                             "teacher's ArcFace classifier 'weight' [num_classes, embedding_dim]")
        teacher_head = models.ArcFaceHead(m.embedding_dim, num_classes, s2.arcface_scale, s2.arcface_margin)
        teacher_head.load_state_dict(torch.load(m.discriminative_teacher_head, map_location="cpu",
                                                weights_only=True))
    classifier = models.ArcFaceHead(m.embedding_dim, num_classes, s2.arcface_scale, s2.arcface_margin)
    return DiscriminativeStage(runtime, student.backbone, student.head, classifier, teacher=teacher,
                               teacher_classifier=teacher_head,
                               distill=make_distill(s2, n_data, m.embedding_dim, config.backend),
                               kd_weight=s2.kd_weight, distill_weight=s2.distill_weight,
                               kd_temperature=s2.kd_temperature)


def train_gdrd(config: TrainConfig, resume: str | Path | None = None, dataset: Dataset | None = None) -> Path:
    """Both stages end to end (resuming from a stage1.pt or stage2.pt); returns the student.pt path."""
    from ..data import open_dataset
    runtime = Runtime.create(config.device, config.amp)
    seed_everything(config.seed)
    out = Path(config.output_dir)
    handler = log_to_file(out / "train.log", runtime)
    scalars = None
    try:
        if dataset is None:
            if config.data.train_root is None:
                raise ValueError("data.train_root is not set: pass an identity-folder tree, a .rec or a folder "
                                 "holding train.rec (e.g. --set data.train_root=/data/faces_webface_112x112)")
            dataset = open_dataset(config.data.train_root, config.data.image_size, as_uint8=True)
        num_classes = int(max(dataset.targets)) + 1
        log.info("config %s", to_dict(config))
        log.info("data %d images, %d identities", len(dataset), num_classes)
        state = ckpt.load_checkpoint(resume) if resume is not None else None
        student = models.build_student(config.models.student)
        scalars = ScalarLogger(out) if runtime.is_main else None
        validators = [] if not config.eval.val_targets else [Validator(
            student.net, config.eval.val_targets, out, every=config.eval.val_every,
            resolution=config.data.resolution, image_size=config.data.image_size,
            interpolation=config.data.interpolation, antialias=config.data.antialias,
            batch_size=config.eval.batch_size)]
        if state is None or state["stage"] == "stage1":
            stage1 = make_trainer(build_stage1(config, runtime, student), dataset, runtime, config,
                                  config.stage1.optim, scalars=scalars)
            if state is not None:
                stage1.load_state_dict(state)
                state = None
            stage1.train_steps()
            stage1.save()
            del stage1
        # stage 2 trains the student's output: it is the stage that validates
        stage2 = make_trainer(build_stage2(config, runtime, student, num_classes, len(dataset)), dataset, runtime,
                              config, config.stage2.optim, scalars=scalars, step_hooks=validators)
        if state is not None:
            stage2.load_state_dict(state)
        stage2.train_steps()
        stage2.save()
        path = out / "student.pt"
        if runtime.is_main:
            ckpt.save_checkpoint(student.net.state_dict(), path)
        log.info("student saved to %s", path)
        return path
    finally:
        if scalars is not None:
            scalars.close()
        if handler is not None:
            logging.getLogger("gdrd_fast").removeHandler(handler)

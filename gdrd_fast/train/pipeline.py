"""A recipe (TrainConfig) turned into the stages of its variant on a training set (identity folders or .rec),
and run.

Each stage writes its trainer state to <output_dir>/<stage>.pt: stage1.pt and stage2.pt for GDRD,
single.pt for a one-stage variant. The trained student is saved as a plain IResNet state dict
(insightface keys) in student.pt, ready for `gdrd-fast eval`.
"""
from __future__ import annotations

import dataclasses
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import models
from ..losses import CRDLoss, FeatureRegressionLoss, RelationalContrastiveLoss
from ..atomic import remove_stale
from . import checkpoint as ckpt, signals
from . import teacher_cache
from .checks import DISCRIMINATIVE_VARIANTS, check_config, check_parts
from .config import GENERATIVE_VARIANTS, VARIANTS, OptimConfig, OptimizerConfig, Stage2Config, TrainConfig, to_dict
from .loop import Trainer, log_to_file
from .runtime import Runtime, seed_everything
from .stages import DiscriminativeStage, GenerativeStage, GenerativeTarget, Stage
from .validation import ScalarLogger, Validator, drop_rows_after

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


class PlannedStage(NamedTuple):
    """One trainer run of a variant: its checkpoint name, how to build its Stage, its schedule, and
    the parameter groups that get an optimizer of their own (None: the stage's)."""
    name: str
    build: Callable[[], Stage]
    optim: OptimConfig
    group_optims: dict[str, OptimizerConfig | None]


@dataclass
class Parts:
    """What a variant's stages are built from. Stages are built only when their turn comes: building
    stage 2 freezes the backbone that stage 1 trains, and a variant builds only the teachers it uses."""
    runtime: Runtime
    backbone: nn.Module  # S_b, with .out_channels
    head: nn.Module  # S_h
    classifier: Callable[[], nn.Module]  # a fresh ArcFace head over the training identities
    discriminative: Callable[[], tuple[nn.Module, nn.Module | None]]  # T_d and its ArcFace head (for KD)
    generative: Callable[[], nn.Module]  # T_g, declaring .feature_shape (or .out_channels)
    n_data: int
    embedding_dim: int
    backend: str = "auto"
    teacher_input: int | None = None  # None: T_g's declared input size
    timestep: int = 0
    noise: float = 0.0


ONE_STAGE_DISTILL = {"gdrd-e2e": None, "crrcd": "rcd", "crd": "crd", "kd": "none", "baseline": "none"}


def teacher_channels(teacher: nn.Module) -> int:
    shape = getattr(teacher, "feature_shape", None)
    return int(shape[0]) if shape is not None else int(teacher.out_channels)


def variant_plan(variant: str, parts: Parts, stage1_optim: OptimConfig, stage2: Stage2Config,
                 one_stage_optim: OptimConfig) -> list[PlannedStage]:
    """The stages variant `variant` trains, in order (config.VARIANTS lists them)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    rt, s2 = parts.runtime, stage2
    distill_optims = {"distill": s2.distill_optim}

    def generative_parts():
        teacher = parts.generative()
        size = parts.teacher_input if parts.teacher_input is not None else getattr(teacher, "input_size", None)
        target = GenerativeTarget(teacher, size, parts.timestep, parts.noise)
        return target, FeatureRegressionLoss(parts.backbone.out_channels, teacher_channels(teacher),
                                             backend=parts.backend)

    def stage1() -> GenerativeStage:
        target, regression = generative_parts()
        return GenerativeStage(rt, parts.backbone, target.teacher, regression, target.input_size, target.timestep,
                               target.noise)

    def discriminative(distill: str, train_backbone: bool, with_teacher: bool = True, e2e: bool = False):
        teacher, teacher_head = parts.discriminative() if with_teacher else (None, None)
        generative, regression = generative_parts() if e2e else (None, None)
        stage = DiscriminativeStage(
            rt, parts.backbone, parts.head, parts.classifier(), train_backbone=train_backbone, teacher=teacher,
            teacher_classifier=teacher_head if s2.kd_weight and with_teacher else None,
            distill=make_distill(dataclasses.replace(s2, distill=distill), parts.n_data, parts.embedding_dim,
                                 parts.backend) if with_teacher else None,
            kd_weight=s2.kd_weight if with_teacher else 0.0, distill_weight=s2.distill_weight,
            kd_temperature=s2.kd_temperature, generative=generative, regression=regression, gen_weight=s2.gen_weight)
        return stage

    def one_stage(build):
        def named():
            stage = build()
            stage.name = "single"
            return stage
        return PlannedStage("single", named, one_stage_optim, distill_optims)

    first = PlannedStage("stage1", stage1, stage1_optim, {})
    if variant == "stage1-probe":
        return [first]
    if variant == "gdrd":
        return [first, PlannedStage("stage2", lambda: discriminative(s2.distill, False), s2.optim, distill_optims)]
    if variant == "gdrd-unfrozen":
        backbone_optim = OptimizerConfig(s2.optim.optimizer, s2.optim.lr * s2.backbone_lr_factor, s2.optim.momentum,
                                         s2.optim.weight_decay)
        return [first, PlannedStage("stage2", lambda: discriminative(s2.distill, True), s2.optim,
                                    distill_optims | {"backbone": backbone_optim})]
    if variant == "gdrd-e2e":
        return [one_stage(lambda: discriminative(s2.distill, True, e2e=True))]
    if variant == "baseline":
        return [one_stage(lambda: discriminative("none", True, with_teacher=False))]
    return [one_stage(lambda: discriminative(ONE_STAGE_DISTILL[variant], True))]


def view_args(config: TrainConfig) -> dict:
    """How the trainer makes a batch's views (loop.make_views), from the recipe."""
    d = config.data
    return dict(resolution=d.resolution, flip=d.flip, interpolation=d.interpolation, antialias=d.antialias)


def teacher_outputs(config: TrainConfig, parts: Parts) -> dict:
    """What the variant's stages read from their frozen teachers: teacher_cache.stage_outputs without
    building the stages (building stage 2 would freeze the backbone stage 1 trains)."""
    outputs, views = {}, view_args(config)
    if config.variant in GENERATIVE_VARIANTS:
        teacher = parts.generative()
        size = parts.teacher_input if parts.teacher_input is not None else getattr(teacher, "input_size", None)
        target = GenerativeTarget(teacher, size, parts.timestep, parts.noise)
        outputs["tap"] = (teacher_cache.tap_spec(target, views), target)
    if config.variant in DISCRIMINATIVE_VARIANTS:
        teacher = parts.discriminative()[0].eval()
        outputs["embedding"] = (teacher_cache.embedding_spec(teacher), teacher)
    return outputs


def cache_teachers(config: TrainConfig, dtype: str = "bf16", chunk: int = 64, progress: bool = True,
                   dataset: Dataset | None = None) -> dict:
    """`gdrd-fast cache-teachers`: write (or resume, or confirm) data.teacher_cache for this recipe; returns
    its manifest. Under torchrun the chunks are shared out over the ranks."""
    from ..data import open_dataset
    if config.data.teacher_cache is None:
        raise ValueError("data.teacher_cache is not set: name the folder to write the teachers' outputs to "
                         "(e.g. --set data.teacher_cache=/data/casia_teacher_cache)")
    check_config(dataclasses.replace(config, data=dataclasses.replace(config.data, teacher_cache=None)),
                 need_data=dataset is None)
    runtime = Runtime.create(config.device, "none")  # the cache holds the float32 teachers' outputs
    seed_everything(config.seed)  # random teachers (allow_random_teachers) are then the training run's
    if dataset is None:
        dataset = open_dataset(config.data.train_root, config.data.image_size, as_uint8=True,
                               mismatch=config.data.mismatch)
    student = models.build_student(config.models.student)
    parts = paper_parts(config, runtime, student, int(max(dataset.targets)) + 1, len(dataset))
    outputs = {name: (spec, module.to(runtime.device)) for name, (spec, module) in teacher_outputs(config, parts).items()}
    return teacher_cache.build_cache(config.data.teacher_cache, outputs, dataset, view_args(config), dtype, chunk,
                                     runtime.device, runtime.rank, runtime.world_size, progress)


def make_trainer(planned: PlannedStage, dataset: Dataset, runtime: Runtime, config: TrainConfig, cache=None,
                 **hooks) -> Trainer:
    """hooks: Trainer's scalars= and step_hooks=; cache: the opened data.teacher_cache."""
    d = config.data
    return Trainer(planned.build(), dataset, runtime, planned.optim, **hooks, batch_size=d.batch_size,
                   seed=config.seed, teacher_cache=cache, **view_args(config),
                   num_workers=d.num_workers, output_dir=config.output_dir, log_every=config.log_every,
                   checkpoint_every=config.checkpoint_every, group_optims=planned.group_optims,
                   shard_banks=config.stage2.crd.sharded, sync_batchnorm=config.sync_batchnorm,
                   meta={"variant": config.variant})


def paper_parts(config: TrainConfig, runtime: Runtime, student: models.Student, num_classes: int,
                n_data: int) -> Parts:
    """The paper's networks (IResNet student, IResNet ArcFace teacher, PGDiff or diffusers T_g) from a recipe."""
    m, s2 = config.models, config.stage2

    def classifier():
        return models.ArcFaceHead(m.embedding_dim, num_classes, s2.arcface_scale, s2.arcface_margin)

    def discriminative():
        teacher = models.build_discriminative_teacher(m.discriminative_teacher, m.discriminative_teacher_weights)
        teacher_head = None
        if s2.kd_weight:
            if m.discriminative_teacher_head is None:
                raise ValueError("stage2.kd_weight > 0 needs models.discriminative_teacher_head: a state dict with "
                                 "the teacher's ArcFace classifier 'weight' [num_classes, embedding_dim]")
            teacher_head = classifier()
            models.checkpoints.load_exact(teacher_head, models.checkpoints.read_state_dict(
                m.discriminative_teacher_head, what="models.discriminative_teacher_head"),
                what="models.discriminative_teacher_head")
        return teacher, teacher_head

    def generative():
        teacher_config = m.generative_teacher_config if m.generative_teacher != "pgdiff" else None
        return models.build_generative_teacher(m.generative_teacher, teacher_config, m.generative_teacher_weights,
                                               m.generative_teacher_tap)

    return Parts(runtime, student.backbone, student.head, classifier, discriminative, generative, n_data,
                 m.embedding_dim, config.backend, m.generative_teacher_input, m.generative_teacher_timestep,
                 m.generative_teacher_noise)


def plan_for(config: TrainConfig, parts: Parts) -> list[PlannedStage]:
    return variant_plan(config.variant, parts, config.stage1.optim, config.stage2, config.one_stage_optim)


def build_stage1(config: TrainConfig, runtime: Runtime, student: models.Student) -> GenerativeStage:
    """GDRD's stage 1 from a recipe (n_data and the classes do not matter to it)."""
    return variant_plan("gdrd", paper_parts(config, runtime, student, 1, 1), config.stage1.optim, config.stage2,
                        config.one_stage_optim)[0].build()


def build_stage2(config: TrainConfig, runtime: Runtime, student: models.Student, num_classes: int,
                 n_data: int) -> DiscriminativeStage:
    """GDRD's stage 2 from a recipe (freezes the student's backbone)."""
    return variant_plan("gdrd", paper_parts(config, runtime, student, num_classes, n_data), config.stage1.optim,
                        config.stage2, config.one_stage_optim)[1].build()


def train_gdrd(config: TrainConfig, resume: str | Path | None = None, dataset: Dataset | None = None) -> Path:
    """Every stage of config.variant (resuming from one of its checkpoints); returns the student.pt path.

    Each stage writes <output_dir>/<stage>.pt (stage1, stage2, or single for one-stage variants).
    SIGINT / SIGTERM stop the run after the current step, once it is saved (train/signals.py).
    The rows of metrics.csv and losses.csv that a resumed run writes again (those after its checkpoint's
    step) are dropped first, so every row appears once, as in an uninterrupted run."""
    with signals.stop_gracefully():
        return _train_gdrd(config, resume, dataset)


def _train_gdrd(config: TrainConfig, resume: str | Path | None, dataset: Dataset | None) -> Path:
    from ..data import open_dataset
    check_config(config, need_data=dataset is None)  # every file and key, before anything is loaded (train/checks.py)
    runtime = Runtime.create(config.device, config.amp)
    seed_everything(config.seed)
    out = Path(config.output_dir)
    handler = log_to_file(out / "train.log", runtime)
    scalars = None
    try:
        if runtime.is_main:
            for stale in remove_stale(out):
                log.info("removed %s, the temporary file of a write that never finished", stale)
        if dataset is None:
            if config.data.train_root is None:
                raise ValueError("data.train_root is not set: pass an identity-folder tree, a .rec or a folder "
                                 "holding train.rec (e.g. --set data.train_root=/data/faces_webface_112x112)")
            dataset = open_dataset(config.data.train_root, config.data.image_size, as_uint8=True,
                                   mismatch=config.data.mismatch)
        num_classes = int(max(dataset.targets)) + 1
        log.info("config %s", to_dict(config))
        log.info("data %d images, %d identities, variant %s", len(dataset), num_classes, config.variant)
        state = ckpt.load_checkpoint(resume) if resume is not None else None
        student = models.build_student(config.models.student)
        plan = plan_for(config, paper_parts(config, runtime, student, num_classes, len(dataset)))
        names = [p.name for p in plan]
        parts = paper_parts(config, runtime, student, num_classes, len(dataset))
        check_parts(config, parts, names, state, out if runtime.is_main else None)  # teachers, before the first step
        cache = None
        if config.data.teacher_cache is not None:  # checked against every stage now, not after stage 1
            cache = teacher_cache.TeacherCache(config.data.teacher_cache)
            with torch.random.fork_rng(devices=[]):  # building the teachers again must not shift the stages' init
                wanted = {name: spec for name, (spec, _) in teacher_outputs(config, parts).items()}
            cache.check(wanted, teacher_cache.dataset_fingerprint(dataset))
        if state is not None and state.get("stage") not in names:
            raise ValueError(f"resume: {resume} is a {state.get('stage')!r} checkpoint; variant {config.variant!r} "
                             f"trains {names}")
        start = names.index(state["stage"]) if state is not None else 0
        if state is not None:
            log.info("resumed from %s: %s after step %d", resume, state["stage"], int(state["step"]))
        if runtime.is_main:  # before the Validator reads the best accuracies so far from metrics.csv
            for rows in ("metrics.csv", "losses.csv"):
                dropped = drop_rows_after(out / rows, names, state["stage"] if state is not None else None,
                                          int(state["step"]) if state is not None else 0)
                if dropped:
                    log.info("%s: dropped %d row(s) after the starting point, written again by this run", rows,
                             dropped)
        scalars = ScalarLogger(out) if runtime.is_main else None
        validators = [] if not config.eval.val_targets else [Validator(
            student.net, config.eval.val_targets, out, every=config.eval.val_every,
            resolution=config.data.resolution, image_size=config.data.image_size,
            interpolation=config.data.interpolation, antialias=config.data.antialias,
            batch_size=config.eval.batch_size)]
        for i, planned in enumerate(plan[start:], start):
            # the last stage trains the student's output: it is the stage that validates (stage1-probe: none)
            hooks = validators if i == len(plan) - 1 and config.variant != "stage1-probe" else []
            trainer = make_trainer(planned, dataset, runtime, config, cache, scalars=scalars, step_hooks=hooks)
            if state is not None and i == start:
                trainer.load_state_dict(state)
            trainer.train_steps()
            path = trainer.save()
            if trainer.stop_requested():  # the signal came after the stage's last step
                raise signals.StopRequested(signals.requested() or signal.SIGTERM,
                                            f"{planned.name}: stopped at its end; continue with --resume {path}")
            del trainer
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

"""The demo's teachers: an HR ArcFace network (T_d) and a briefly trained diffusers denoiser whose encoder
is T_g. They are trained once per grid, from the recipe's seed, and saved in <grid>/teachers/."""
from __future__ import annotations

import logging
import shutil
import time
import zlib
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .. import models
from ..data import degrade
from ..train import DiscriminativeStage, Runtime, Trainer, log_to_file, seed_everything
from ..train import checkpoint as ckpt, teacher_cache
from ..train.config import from_dict
from ..train.stages import GenerativeTarget
from .config import DemoConfig
from .data import data_cache_dir, load_cell_data
from .denoiser import DenoiserStage
from .nets import SmallFaceNet
from .processes import step_reporter

log = logging.getLogger("gdrd_fast.demo")


class TeacherTrainer:
    """Trains the demo's teachers one after another; every Trainer's history is kept for the plots."""

    def __init__(self, config: DemoConfig, runtime: Runtime, train_set, progress: bool = True,
                 report: Callable[..., None] | None = None):
        self.config, self.runtime, self.train_set, self.progress = config, runtime, train_set, progress
        self.report = report  # a grid worker's progress messages (processes.step_reporter)
        self.num_classes = int(train_set.targets.max()) + 1
        self.histories: dict[str, list[dict]] = {}
        self.timings: dict[str, float] = {}

    def _seed(self, label: str) -> None:
        """Each model's init and draws depend only on (seed, its label), not on what trained before it."""
        seed_everything(self.config.seed + zlib.crc32(label.encode()))

    def _train(self, label: str, stage, optim, resolution: int | None, batch_size: int | None = None) -> None:
        start = time.perf_counter()
        trainer = Trainer(stage, self.train_set, self.runtime, optim, batch_size=batch_size or self.config.batch_size,
                          seed=self.config.seed, resolution=resolution, log_every=max(1, optim.steps // 10),
                          progress=self.progress, name=label,
                          group_optims={"distill": self.config.stage2.distill_optim},
                          step_hooks=[step_reporter(self.report, 0, optim.steps)] if self.report else [])
        terms = trainer.train_steps()
        self.histories[label] = trainer.history
        self.timings[label] = time.perf_counter() - start
        log.info("%s: %d steps in %.1fs, last %s", label, trainer.step, self.timings[label], terms)

    def hr_teacher(self):
        self._seed("HR teacher")
        c = self.config
        net = SmallFaceNet(c.width, c.image_size, c.embedding_dim)
        head = models.ArcFaceHead(c.embedding_dim, self.num_classes, c.stage2.arcface_scale, c.stage2.arcface_margin)
        stage = DiscriminativeStage(self.runtime, net.backbone, net.head, head, train_backbone=True, input="hr",
                                    kd_weight=0.0)
        self._train("HR teacher", stage, c.teacher, resolution=None)
        return net.eval(), head

    def generative_teacher(self) -> nn.Module:
        """The denoiser UNet, briefly trained; its encoder (models.DiffusionEncoder at denoiser.tap) is T_g."""
        d = self.config.denoiser
        self._seed("denoiser")
        unet = models.build_unet(dict(d.unet))
        self._train("denoiser", DenoiserStage(self.runtime, unet, d.image_size, d.train_timesteps), d.optim,
                    resolution=None, batch_size=d.batch_size)
        return unet.eval()


def teacher_paths(out: Path) -> dict[str, Path]:
    return {"hr": out / "teachers" / "hr_teacher.pt", "denoiser": out / "teachers" / "denoiser.pt"}


def train_teachers(config: DemoConfig, out: Path, train_set, runtime: Runtime, progress: bool = True,
                   which: Sequence[str] = ("hr", "denoiser"), report: Callable[..., None] | None = None) -> dict:
    """Train (or reuse, when saved) the named teachers; returns their training histories and timings."""
    paths, teachers = teacher_paths(out), TeacherTrainer(config, runtime, train_set, progress, report)
    if "hr" in which and not paths["hr"].is_file():
        net, head = teachers.hr_teacher()
        ckpt.save_checkpoint({"net": net.state_dict(), "head": head.state_dict()}, paths["hr"])
    if "denoiser" in which and not paths["denoiser"].is_file():
        unet = teachers.generative_teacher()
        ckpt.save_checkpoint({"unet": unet.state_dict()}, paths["denoiser"])
    return {"histories": dict(teachers.histories), "timings": dict(teachers.timings)}


def cache_path(out: Path, resolution: int) -> Path:
    return out / "teachers" / "cache" / f"r{resolution}"


def cache_teacher_outputs(config: DemoConfig, out: Path, train_set, resolutions: Sequence[int]) -> dict:
    """Both trained teachers' outputs over the training set (T_g's tap of each LR face, T_d's embedding),
    written once per resolution into <grid>/teachers/cache/r<res> in float32, so that the cells read them
    instead of running the teachers at every step (train/teacher_cache.py); a rerun reuses them. A cache of
    teachers trained anew is rewritten. Returns its timings."""
    d, timings = config.denoiser, {}
    if d.noise:  # fresh noise every step: nothing to cache, the cells run the teachers
        log.info("denoiser.noise > 0: the teachers' outputs are not cached")
        return {"timings": timings}
    teacher, _, encoder = load_teachers(config, out, int(train_set.targets.max()) + 1)
    target = GenerativeTarget(encoder, d.image_size, d.timestep, d.noise)
    for r in resolutions:
        start, folder = time.perf_counter(), cache_path(out, r)
        views = dict(resolution=r, flip=True, interpolation="bilinear", antialias=True)  # the cells' Trainer's
        outputs = {"tap": (teacher_cache.tap_spec(target, views), target),
                   "embedding": (teacher_cache.embedding_spec(teacher), teacher)}
        try:
            teacher_cache.build_cache(folder, outputs, train_set, views, "float32", progress=False)
        except teacher_cache.StaleCacheError:  # the teachers were trained again: their old outputs go
            shutil.rmtree(folder)
            teacher_cache.build_cache(folder, outputs, train_set, views, "float32", progress=False)
        timings[f"teacher cache r{r}"] = time.perf_counter() - start
    return {"timings": timings}


def train_denoiser_job(spec: dict, report: Callable[..., None] | None = None) -> dict:
    """The denoiser, trained in a grid worker while the others run the cells that do not need it; then the
    teachers' outputs are cached for the cells that wait for it."""
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    config = from_dict(DemoConfig, spec["config"])
    runtime = Runtime.create(spec.get("device", "cpu"))
    grid = Path(spec["grid_dir"])
    handler = log_to_file(grid / "teachers" / "denoiser.log", runtime)
    try:
        train_set = load_cell_data(config, spec.get("train_root"), spec.get("pairs"), data_cache_dir(grid))["train"]
        trained = train_teachers(config, grid, train_set, runtime, progress=False, which=("denoiser",),
                                 report=report)
        trained["timings"] |= cache_teacher_outputs(config, grid, train_set, spec["resolutions"])["timings"]
        return trained
    finally:
        if handler is not None:
            logging.getLogger("gdrd_fast").removeHandler(handler)


def load_hr_teacher(config: DemoConfig, out: Path, num_classes: int):
    """(HR teacher net, its ArcFace head), in eval mode."""
    saved = ckpt.load_checkpoint(teacher_paths(out)["hr"])
    net = SmallFaceNet(config.width, config.image_size, config.embedding_dim)
    head = models.ArcFaceHead(config.embedding_dim, num_classes, config.stage2.arcface_scale,
                              config.stage2.arcface_margin)
    net.load_state_dict(saved["net"])
    head.load_state_dict(saved["head"])
    return net.eval(), head.eval()


def load_generative_teacher(config: DemoConfig, out: Path) -> models.DiffusionEncoder:
    """The denoiser's encoder T_g, in eval mode."""
    d = config.denoiser
    unet = models.build_unet(dict(d.unet))
    unet.load_state_dict(ckpt.load_checkpoint(teacher_paths(out)["denoiser"])["unet"])
    return models.DiffusionEncoder(unet.eval(), d.tap, input_size=d.image_size).eval()


def load_teachers(config: DemoConfig, out: Path, num_classes: int):
    """(HR teacher net, its ArcFace head, the denoiser's encoder T_g), in eval mode."""
    return (*load_hr_teacher(config, out, num_classes), load_generative_teacher(config, out))


def teacher_feature(encoder, resolution: int):
    """T_g's feature of a face seen at resolution x resolution, as stage 1 feeds it (flattened)."""
    def features(x):
        lr = degrade(x, resolution)
        lr = torch.nn.functional.interpolate(lr, size=encoder.input_size, mode="bicubic",
                                             align_corners=False).clamp_(-1, 1)
        return encoder(lr).flatten(1)
    return features

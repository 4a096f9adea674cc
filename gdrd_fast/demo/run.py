"""The offline demo: GDRD against a no-distillation baseline and CRD, at 16x16, on CPU in minutes.

Data: the SYNTHETIC face set of gdrd_fast.data.synthetic (identity partly in coarse geometry that
survives 16x16, partly in fine detail that does not), or a real identity folder + insightface .bin.
Models: an HR ArcFace teacher, a briefly trained diffusers UNet denoiser (the generative teacher),
then, on the same step budget, three 16x16 students: GDRD (stage 1 + stage 2 with RCD), a baseline
trained alone, and a CRD student. The verification table (LFW protocol) reports what it measures.
"""
from __future__ import annotations

import dataclasses
import io
import logging
import time
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import models
from ..data import IdentityFolderDataset, SyntheticFaces, degrade, load_pairs_bin, sample_pairs
from ..data.images import atomic_write_bytes
from ..eval import extract_embeddings, markdown_table, plot_roc, verification_rows, verify, write_json
from ..losses import FeatureRegressionLoss
from ..train import DiscriminativeStage, GenerativeStage, Runtime, Trainer, log_to_file, seed_everything
from ..train.config import to_dict
from ..train.pipeline import make_distill
from .config import DemoConfig
from .denoiser import DenoiserStage
from .nets import SmallFaceNet

log = logging.getLogger("gdrd_fast.demo")
SYNTHETIC_NOTE = ("SYNTHETIC data: face-like images drawn by gdrd_fast.data.synthetic, not real faces; "
                  "numbers are not comparable with LFW results.")


def load_data(config: DemoConfig, train_root: str | None = None, pairs: str | None = None):
    """(train dataset, pair images (2N, 3, S, S), issame (N,), data name, synthetic?)."""
    if (train_root is None) != (pairs is None):
        raise ValueError("a real run needs both train_root (identity folders) and pairs (an insightface .bin)")
    size = config.image_size
    if train_root is None:
        d = config.data
        train = SyntheticFaces(d.train_identities, d.images_per_identity, config.seed, size)
        test = SyntheticFaces(d.test_identities, d.test_images_per_identity, config.seed, size,
                              first_identity=d.train_identities)
        index, issame = sample_pairs(test.targets, pairs_per_fold=d.pairs_per_fold, seed=config.seed)
        images = test.images()[index.flatten()]
        name = (f"SYNTHETIC faces (seed {config.seed}; {d.train_identities} train identities x "
                f"{d.images_per_identity}, {len(issame)} pairs over {d.test_identities} unseen identities)")
        return train, images, issame, name, True
    train = IdentityFolderDataset(train_root, size)
    images, issame = load_pairs_bin(pairs)
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False).clamp_(-1, 1)
    return train, images, issame, f"real data: {train_root} ({len(train)} images) + {pairs}", False


class Demo:
    """Trains the demo's models one after another; every Trainer's history is kept for the plots."""

    def __init__(self, config: DemoConfig, runtime: Runtime, train_set, progress: bool = True):
        self.config, self.runtime, self.train_set, self.progress = config, runtime, train_set, progress
        self.num_classes = int(train_set.targets.max()) + 1
        self.histories: dict[str, list[dict]] = {}
        self.timings: dict[str, float] = {}

    def _seed(self, label: str) -> None:
        """Each model's init and draws depend only on (seed, its label), not on what trained before it."""
        seed_everything(self.config.seed + zlib.crc32(label.encode()))

    def _arcface(self) -> models.ArcFaceHead:
        s2 = self.config.stage2
        return models.ArcFaceHead(self.config.embedding_dim, self.num_classes, s2.arcface_scale, s2.arcface_margin)

    def _net(self) -> SmallFaceNet:
        return SmallFaceNet(self.config.width, self.config.image_size, self.config.embedding_dim)

    def _train(self, label: str, stage, optim, resolution: int | None, batch_size: int | None = None) -> None:
        start = time.perf_counter()
        trainer = Trainer(stage, self.train_set, self.runtime, optim, batch_size=batch_size or self.config.batch_size,
                          seed=self.config.seed, resolution=resolution, log_every=max(1, optim.steps // 10),
                          progress=self.progress, name=label,
                          group_optims={"distill": self.config.stage2.distill_optim})
        terms = trainer.train_steps()
        self.histories[label] = trainer.history
        self.timings[label] = time.perf_counter() - start
        log.info("%s: %d steps in %.1fs, last %s", label, trainer.step, self.timings[label], terms)

    def hr_teacher(self):
        self._seed("HR teacher")
        net, head = self._net(), self._arcface()
        stage = DiscriminativeStage(self.runtime, net.backbone, net.head, head, train_backbone=True, input="hr",
                                    kd_weight=0.0)
        self._train("HR teacher", stage, self.config.teacher, resolution=None)
        return net.eval(), head

    def generative_teacher(self) -> nn.Module:
        d = self.config.denoiser
        self._seed("denoiser")
        unet = models.build_unet(dict(d.unet))
        self._train("denoiser", DenoiserStage(self.runtime, unet, d.image_size, d.train_timesteps), d.optim,
                    resolution=None, batch_size=d.batch_size)
        return models.DiffusionEncoder(unet.eval(), d.tap)

    def gdrd(self, teacher, teacher_head, encoder) -> SmallFaceNet:
        c = self.config
        self._seed("GDRD")
        net = self._net()
        regression = FeatureRegressionLoss(net.backbone.out_channels, encoder.out_channels, backend=c.backend)
        stage1 = GenerativeStage(self.runtime, net.backbone, encoder, regression, c.denoiser.image_size)
        self._train("GDRD stage 1", stage1, c.stage1, c.resolution)
        stage2 = DiscriminativeStage(self.runtime, net.backbone, net.head, self._arcface(), teacher=teacher,
                                     teacher_classifier=teacher_head,
                                     distill=make_distill(c.stage2, len(self.train_set), c.embedding_dim, c.backend),
                                     kd_weight=c.stage2.kd_weight, distill_weight=c.stage2.distill_weight,
                                     kd_temperature=c.stage2.kd_temperature)
        self._train("GDRD stage 2", stage2, c.stage2.optim, c.resolution)
        return net.eval()

    def single_stage_student(self, label: str, teacher=None, teacher_head=None, distill: str = "none") -> SmallFaceNet:
        """A whole LR student trained in one stage for the GDRD budget: baseline (no teacher) or CRD."""
        c = self.config
        self._seed(label)
        net = self._net()
        s2 = dataclasses.replace(c.stage2, distill=distill)
        stage = DiscriminativeStage(self.runtime, net.backbone, net.head, self._arcface(), train_backbone=True,
                                    teacher=teacher, teacher_classifier=teacher_head,
                                    distill=make_distill(s2, len(self.train_set), c.embedding_dim, c.backend),
                                    kd_weight=c.stage2.kd_weight if teacher is not None else 0.0,
                                    distill_weight=c.stage2.distill_weight, kd_temperature=c.stage2.kd_temperature)
        self._train(label, stage, c.student_budget, c.resolution)
        return net.eval()


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
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def run_demo(output_dir: str | Path, config: DemoConfig, train_root: str | None = None, pairs: str | None = None,
             device: str = "cpu", progress: bool = True) -> dict:
    """Train everything, evaluate, and write demo.log, results.json, results.md, roc.png, training.png."""
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.create(device)
    handler = log_to_file(out / "demo.log", runtime)
    try:
        seed_everything(config.seed)
        train_set, pair_images, issame, data_name, synthetic = load_data(config, train_root, pairs)
        note = SYNTHETIC_NOTE if synthetic else "real data supplied by the user"
        log.info("%s", note)
        log.info("data: %s", data_name)
        demo = Demo(config, runtime, train_set, progress)
        teacher, teacher_head = demo.hr_teacher()
        encoder = demo.generative_teacher()
        students = {
            f"LR GDRD ({config.resolution}x{config.resolution})": demo.gdrd(teacher, teacher_head, encoder),
            f"LR baseline ({config.resolution}x{config.resolution}, no distillation)":
                demo.single_stage_student("LR baseline"),
            f"LR CRD ({config.resolution}x{config.resolution})":
                demo.single_stage_student("LR CRD", teacher, teacher_head, "crd"),
        }
        r = config.resolution
        to_lr = lambda x: degrade(x, r)  # noqa: E731 - the student's view of an eval face
        demo._seed("untrained")
        untrained = demo._net().eval()
        evaluated = {f"HR teacher ({config.image_size}x{config.image_size})": (teacher, None),
                     **{name: (net, to_lr) for name, net in reversed(students.items())},
                     f"HR teacher on {r}x{r} input": (teacher, to_lr),
                     f"untrained network ({r}x{r}, chance level)": (untrained, to_lr)}
        results = {}
        for name, (net, transform) in evaluated.items():
            emb = extract_embeddings(net, pair_images, transform=transform, device=runtime.device, progress=progress,
                                     desc=f"embeddings: {name}")
            results[name] = verify(emb[0::2], emb[1::2], issame)
        elapsed = time.perf_counter() - start
        title = f"Verification on {data_name}"
        table = markdown_table(verification_rows(results))
        md = [f"# GDRD demo: {title}", "", f"**{note}**", "", table, "",
              f"Protocol: LFW verification (10 contiguous folds, squared L2 on flip-summed, normalised embeddings). "
              f"Students see faces degraded to {r}x{r} (bilinear, antialias) and upsampled to "
              f"{config.image_size}x{config.image_size}; every student trains for "
              f"{config.student_budget.steps} steps (GDRD: {config.stage1.steps} stage 1 + "
              f"{config.stage2.optim.steps} stage 2).", "",
              f"Total time {elapsed:.0f} s on {runtime.device} ({torch.get_num_threads()} threads).", ""]
        paths = {"markdown": out / "results.md", "json": out / "results.json", "roc": out / "roc.png",
                 "training": out / "training.png", "log": out / "demo.log"}
        atomic_write_bytes(paths["markdown"], "\n".join(md).encode())
        write_json(paths["json"], {
            "synthetic": synthetic, "note": note, "dataset": data_name,
            "protocol": "LFW verification (insightface conventions, docs/method/evaluation.md)",
            "results": {name: res.as_dict() for name, res in results.items()},
            "timings_s": demo.timings | {"total": elapsed}, "config": to_dict(config)})
        plot_roc(paths["roc"], results, f"ROC, {data_name}")
        plot_training(paths["training"], demo.histories, f"Training losses, {data_name}")
        log.info("results\n%s", table)
        log.info("wrote %s in %.0f s", ", ".join(str(p) for p in paths.values()), elapsed)
        return {"results": results, "table": table, "note": note, "paths": paths, "elapsed_s": elapsed}
    finally:
        if handler is not None:
            logging.getLogger("gdrd_fast").removeHandler(handler)

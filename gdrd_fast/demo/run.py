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
import zlib
from pathlib import Path

import torch.nn.functional as F
from torch import nn

from .. import models
from ..data import IdentityFolderDataset, SyntheticFaces, load_pairs_bin, sample_pairs
from ..data.images import atomic_write_bytes
from ..eval import save_png, write_json
from ..train import DiscriminativeStage, Runtime, Trainer, log_to_file, seed_everything
from ..train.config import to_dict
from .config import DemoConfig
from .denoiser import DenoiserStage
from .nets import SmallFaceNet

log = logging.getLogger("gdrd_fast.demo")
SYNTHETIC_NOTE = ("SYNTHETIC data: face-like images drawn by gdrd_fast.data.synthetic, not real faces; "
                  "numbers are not comparable with LFW results.")
SMOKE_NOTE = ("SMOKE RUN (--quick): tiny models trained for a few steps to check the whole path; "
              "its numbers mean nothing.")


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
        """The denoiser UNet, briefly trained; its encoder (models.DiffusionEncoder at denoiser.tap) is T_g."""
        d = self.config.denoiser
        self._seed("denoiser")
        unet = models.build_unet(dict(d.unet))
        self._train("denoiser", DenoiserStage(self.runtime, unet, d.image_size, d.train_timesteps), d.optim,
                    resolution=None, batch_size=d.batch_size)
        return unet.eval()


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


def run_demo(output_dir: str | Path, config: DemoConfig, train_root: str | None = None, pairs: str | None = None,
             device: str = "cpu", progress: bool = True, jobs: int = 0, threads: int = 1) -> dict:
    """The demo's ablation (config.ablation.variants at config.resolution over config.ablation.seeds seeds),
    the feature geometry of its GDRD student, and a text of what the numbers show; writes results.md,
    results.json, ablation.png, training.png, geometry/ and demo.log beside the grid's cells/ and teachers/."""
    from .ablate import run_grid
    from .analyze import analyze_cell
    from .interpret import interpret
    start = time.perf_counter()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runtime = Runtime.create(device)
    (out / "demo.log").unlink(missing_ok=True)  # one log per run
    handler = log_to_file(out / "demo.log", runtime)
    try:
        a = config.ablation
        summary = run_grid(out, config, a.variants, [config.resolution], a.seeds, train_root, pairs, device, jobs,
                           threads, progress)
        variant = next((v for v in ("gdrd", "gdrd-e2e", "gdrd-unfrozen") if v in a.variants), None)
        geometry = None
        if variant is not None and summary["note"] == SYNTHETIC_NOTE:  # needs labelled test images
            geometry = analyze_cell(out / "cells" / f"{variant}-r{config.resolution}-s0", out / "geometry",
                                    device=device)
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

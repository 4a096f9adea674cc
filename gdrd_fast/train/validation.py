"""Validation during training, as insightface's arcface_torch does it, and the loss terms as scalars.

`Validator` verifies the student on every `eval.val_targets` pairs .bin (lfw, cfp_fp, agedb_30, calfw,
cplfw, ...) every `eval.val_every` steps and at the end of the stage, at the recipe's resolution, with
the LFW protocol of gdrd_fast.eval, on rank 0 only. Each result is one row of <run>/metrics.csv:

    step, stage, target, resolution, accuracy, std, tar_at_far_1e-3, far_of_tar, auc

accuracy and std: the 10-fold verification accuracy (mean, std with ddof=0); auc: the area under the
exact ROC; tar_at_far_1e-3: VerificationResult.tar asked at FAR 1e-3, i.e. the TAR at the smallest FAR
that set's impostor count resolves; far_of_tar: that FAR (1e-3 where the set has enough impostor pairs,
larger for a small set). The best accuracy per target is kept (also across a resume, from
metrics.csv), and the student whose accuracy on the first target is the best so far is saved as
<run>/best.pt (a plain IResNet state dict, like student.pt).

`ScalarLogger` writes every logged step's loss terms as TensorBoard scalars into the run folder
(torch.utils.tensorboard), or, where tensorboard is not installed, as rows of <run>/losses.csv.
"""
from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import write_bytes
from . import checkpoint as ckpt

log = logging.getLogger("gdrd_fast.train")
METRICS_COLUMNS = ("step", "stage", "target", "resolution", "accuracy", "std", "tar_at_far_1e-3", "far_of_tar", "auc")


def _append_rows(path: Path, columns: Sequence[str], rows: list[dict]) -> None:
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def drop_rows_after(path: Path, stages: Sequence[str], stage: str | None, step: int) -> int:
    """Rewrite the csv at `path` (metrics.csv, losses.csv) without the rows a resumed run writes again:
    those of `stage` after `step` and those of the stages after it in `stages` (stage None: a fresh
    run, all rows of `stages`). Returns how many rows were dropped."""
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames or [], list(reader)
    rank = {name: i for i, name in enumerate(stages)}
    limit = (rank[stage], step) if stage is not None else (-1, 0)

    def rerun(row: dict) -> bool:
        if row.get("stage") not in rank:
            return False
        try:
            return (rank[row["stage"]], int(row["step"])) > limit
        except (TypeError, ValueError):  # a row cut short by a kill
            return True

    kept = [row for row in rows if not rerun(row)]
    if len(kept) != len(rows):
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(kept)
        write_bytes(path, buf.getvalue().encode())
    return len(rows) - len(kept)


class Validator:
    """Verification of `net` on pairs .bin targets; call it as a Trainer step hook (rank 0 does the work).

    targets: .bin paths, reported under their file stem; the first decides best.pt. every: step interval
    (0: only at the end of the stage). resolution: the LR side (None: the HR input). image_size: the
    network's input side (pairs are resized to it when they differ).
    """

    def __init__(self, net: nn.Module, targets: Sequence[str | os.PathLike], output_dir: str | os.PathLike, *,
                 every: int = 0, resolution: int | None = 16, image_size: int = 112, interpolation: str = "bilinear",
                 antialias: bool = True, batch_size: int = 128, progress: bool = True):
        if not targets:
            raise ValueError("eval.val_targets is empty: name at least one pairs .bin")
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"eval.val_every must be an int >= 0, got {every!r}")
        self.paths = [Path(t) for t in targets]
        for path in self.paths:
            if not path.is_file():
                raise ValueError(f"eval.val_targets: {str(path)!r} is not a file")
        names = [p.stem for p in self.paths]
        if len(set(names)) != len(names):
            raise ValueError(f"eval.val_targets: two targets share a name: {names}")
        self.net, self.names, self.every = net, names, every
        self.resolution, self.image_size = resolution, image_size
        self.interpolation, self.antialias = interpolation, antialias
        self.batch_size, self.progress = batch_size, progress
        self.output_dir = Path(output_dir)
        self.metrics_path = self.output_dir / "metrics.csv"
        self.best_path = self.output_dir / "best.pt"
        self._pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.best: dict[str, float] = self._best_so_far()

    def _best_so_far(self) -> dict[str, float]:
        """Best accuracy per target already in metrics.csv (a resumed run keeps improving on it)."""
        best: dict[str, float] = {}
        if self.metrics_path.is_file():
            with open(self.metrics_path, newline="") as f:
                for row in csv.DictReader(f):
                    if row.get("target") in self.names and row.get("resolution") == str(self.resolution or "hr"):
                        best[row["target"]] = max(best.get(row["target"], -1.0), float(row["accuracy"]))
        return best

    def _load(self, name: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        from ..data import load_pairs_bin
        if name not in self._pairs:
            images, issame = load_pairs_bin(path, progress=self.progress)
            if images.shape[-1] != self.image_size or images.shape[-2] != self.image_size:
                images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                       antialias=True, align_corners=False).clamp_(-1.0, 1.0)
            self._pairs[name] = (images, issame)
        return self._pairs[name]

    def due(self, step: int, total_steps: int) -> bool:
        return step == total_steps or (self.every > 0 and step % self.every == 0)

    @torch.no_grad()
    def validate(self, step: int, stage: str, device: torch.device) -> list[dict]:
        """Verify every target now; append the rows to metrics.csv, update best and best.pt."""
        from ..data import degrade
        from ..eval import extract_embeddings, verify
        r = self.resolution
        transform = None if r is None else (lambda x: degrade(x, r, mode=self.interpolation,
                                                              antialias=self.antialias))
        was_training = self.net.training
        self.net.eval()
        rows = []
        try:
            for name, path in zip(self.names, self.paths):
                images, issame = self._load(name, path)
                emb = extract_embeddings(self.net, images, batch_size=self.batch_size, transform=transform,
                                         device=device, progress=self.progress, desc=f"validating {name}")
                result = verify(emb[0::2], emb[1::2], issame, far_target=1e-3)
                rows.append({"step": step, "stage": stage, "target": name, "resolution": r or "hr",
                             "accuracy": result.accuracy, "std": result.accuracy_std,
                             "tar_at_far_1e-3": result.tar, "far_of_tar": result.far_level,
                             "auc": result.auc})
        finally:
            self.net.train(was_training)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        _append_rows(self.metrics_path, METRICS_COLUMNS, rows)
        for row in rows:
            name, acc = row["target"], row["accuracy"]
            improved = acc > self.best.get(name, -1.0)
            if improved:
                self.best[name] = acc
                if name == self.names[0]:
                    ckpt.save_checkpoint(self.net.state_dict(), self.best_path)
            log.info("val %s step %d %s %s: accuracy %.4f +- %.4f, best %.4f%s", stage, step, name,
                     row["resolution"], acc, row["std"], self.best[name],
                     " (best.pt)" if improved and name == self.names[0] else "")
        return rows

    def __call__(self, trainer, terms: dict[str, float]) -> None:
        """Trainer step hook: validate when due, on rank 0; the stage's train/eval modes are restored."""
        if not trainer.runtime.is_main or not self.due(trainer.step, trainer.total_steps):
            return
        rows = self.validate(trainer.step, trainer.stage.name, trainer.runtime.device)
        trainer.stage.train()  # a frozen backbone goes back to eval mode (Stage.train handles it)
        if trainer.scalars is not None:
            for row in rows:
                trainer.scalars.add(trainer.stage.name, trainer.step,
                                    {f"val/{row['target']}/accuracy": row["accuracy"]})


class ScalarLogger:
    """Loss terms per logged step: TensorBoard scalars '<stage>/<term>' in output_dir, or, without
    tensorboard, rows (step, stage, term, value) of output_dir/losses.csv. Rank 0 creates it."""

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module needs the tensorboard package
            self.writer, self.csv_path = None, self.output_dir / "losses.csv"
        else:
            self.writer, self.csv_path = SummaryWriter(log_dir=str(self.output_dir)), None

    def add(self, stage: str, step: int, terms: dict[str, float]) -> None:
        if self.writer is not None:
            for term, value in terms.items():
                tag = term if term.startswith("val/") else f"{stage}/{term}"
                self.writer.add_scalar(tag, value, step)
        else:
            _append_rows(self.csv_path, ("step", "stage", "term", "value"),
                         [{"step": step, "stage": stage, "term": t, "value": v} for t, v in terms.items()])

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

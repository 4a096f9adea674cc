"""`gdrd-fast analyze RUN`: the feature geometry of one finished ablation cell (gdrd_fast.eval.geometry).

On the unseen test identities, seen at the cell's resolution: the student's backbone S_b after stage 1,
the student after its last stage (its embedding, and S_b when that stage trained it), the HR teacher T_d
(on HR faces) and the generative teacher T_g (its encoder feature of the LR face, as stage 1 saw it).
Writes geometry.md, geometry.json, cosine.png and embedding.png.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data import degrade
from ..eval.geometry import analyze_features
from ..train import checkpoint as ckpt
from ..train.config import from_dict
from .config import DemoConfig
from .data import data_cache_dir, data_note, load_cell_data
from .nets import SmallBackbone, SmallFaceNet
from .teachers import load_teachers, teacher_feature


@torch.no_grad()
def _features(model, images, transform=None, batch_size: int = 256) -> torch.Tensor:
    out = []
    for batch in images.split(batch_size):
        out.append(model(transform(batch) if transform is not None else batch).flatten(1).float())
    return torch.cat(out)


def find_cell(run: Path) -> Path:
    """RUN is a cell folder, or a grid folder: then its first cell with a stage-1 backbone (a GDRD variant)."""
    if (run / "spec.json").is_file():
        return run
    cells = sorted(p.parent for p in (run / "cells").glob("*/stage1_backbone.pt") if (p.parent / "spec.json").is_file())
    if not cells:
        raise ValueError(f"RUN must be an ablation cell folder (with spec.json) or a grid folder with a finished GDRD "
                         f"cell (cells/*/stage1_backbone.pt); {run} is neither")
    return cells[0]


def analyze_cell(run: str | Path, out_dir: str | Path | None = None, device: str = "cpu") -> dict:
    run = find_cell(Path(run))
    spec = json.loads((run / "spec.json").read_text())
    if not (run / "result.json").is_file():
        raise ValueError(f"{run} has not finished (no result.json): run or resume its grid first")
    config = from_dict(DemoConfig, spec["config"])
    data = load_cell_data(config, spec.get("train_root"), spec.get("pairs"),
                          data_cache_dir(spec["grid_dir"]))
    if data["probe_images"] is None:
        raise ValueError("analyze needs labelled test images: the synthetic data (real pairs files have no labels)")
    images, labels, r = data["probe_images"], data["probe_labels"], config.resolution
    teacher, _, encoder = load_teachers(config, Path(spec["grid_dir"]), int(data["train"].targets.max()) + 1)
    student = SmallFaceNet(config.width, config.image_size, config.embedding_dim)
    student.load_state_dict(ckpt.load_checkpoint(run / "student.pt"))
    student.eval()
    lr = lambda x: degrade(x, r)  # noqa: E731 - the student's view of a face
    features, variant = {}, spec["variant"]
    if (run / "stage1_backbone.pt").is_file():
        backbone = SmallBackbone(config.width)
        backbone.load_state_dict(ckpt.load_checkpoint(run / "stage1_backbone.pt"))
        features["S_b after stage 1"] = _features(backbone.eval(), images, lr)
    if variant != "gdrd":  # gdrd's stage 2 leaves S_b frozen: the same as after stage 1
        features["S_b after training"] = _features(student.backbone, images, lr)
    if variant != "stage1-probe":
        features["student embedding after training"] = _features(student, images, lr)
    features["T_d embedding (HR input)"] = _features(teacher, images)
    features[f"T_g feature ({r}x{r} input)"] = _features(teacher_feature(encoder.eval(), r), images)
    students = [k for k in features if not k.startswith("T_")]
    teachers = [k for k in features if k.startswith("T_")]
    pairs = {f"{s} vs {t}": (s, t) for s in students for t in teachers}
    title = f"{variant} at {r}x{r}, student seed {config.student_seed}"
    return analyze_features(features, labels, out_dir or run / "geometry", title, pairs, note=data_note(data))


def analyze_job(spec: dict, report=None) -> dict:
    """analyze_cell in a grid process, once its cell is trained (run_grid's after_cell), beside the other
    cells: with the main process's thread count (spec["threads"]), so its numbers are those of analyze_cell."""
    previous = torch.get_num_threads()
    torch.set_num_threads(spec["threads"])
    try:
        return analyze_cell(spec["run"], spec["out_dir"], spec.get("device", "cpu"))
    finally:
        torch.set_num_threads(previous)

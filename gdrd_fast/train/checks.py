"""Everything a training run needs, checked before its first step; every failure names its config key.

`check_config` runs first and reads no file: untrained teachers (refused unless allow_random_teachers),
every path key, the head KD needs, the optional packages. `check_parts` then builds the teachers that
the stages to run use (weights loaded, head shape checked against the training identities) and reads
every validation target, so that a wrong file fails in seconds, not after stage 1's 36 epochs. The
modules it builds are dropped again: each stage builds its own when its turn comes, so a teacher is not
held in memory through the stages that do not use it.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path

from .config import GENERATIVE_VARIANTS, TrainConfig

log = logging.getLogger("gdrd_fast.train")
# the variants whose stages distil T_d (pipeline.variant_plan): all but the baseline and stage 1 alone
DISCRIMINATIVE_VARIANTS = ("gdrd", "gdrd-e2e", "gdrd-unfrozen", "crrcd", "crd", "kd")
# the stages that build each teacher (checkpoint names, pipeline.variant_plan)
TEACHER_STAGES = {"generative": ("stage1", "single"), "discriminative": ("stage2", "single")}
WEIGHT_KEYS = {"generative": "models.generative_teacher_weights",
               "discriminative": "models.discriminative_teacher_weights"}


def teachers_used(variant: str) -> list[str]:
    """'generative' and/or 'discriminative': the teachers a variant distils."""
    return [kind for kind, variants in (("generative", GENERATIVE_VARIANTS),
                                        ("discriminative", DISCRIMINATIVE_VARIANTS)) if variant in variants]


def _weights(config: TrainConfig, kind: str) -> str | None:
    return getattr(config.models, WEIGHT_KEYS[kind].split(".")[1])


def check_config(config: TrainConfig, need_data: bool = True) -> None:
    """The checks that need no file read: raises one ValueError listing every problem, each with its key.
    need_data: the run reads data.train_root (not a dataset handed to it)."""
    m, problems = config.models, []
    if need_data and config.data.train_root is None:
        problems.append("data.train_root is not set: pass an identity-folder tree, a .rec or a folder holding "
                        "train.rec (e.g. --set data.train_root=/data/faces_webface_112x112)")
    used = teachers_used(config.variant)
    untrained = [WEIGHT_KEYS[kind] for kind in used if _weights(config, kind) is None]
    if untrained and not config.allow_random_teachers:
        problems.append(f"{' and '.join(untrained)} not set: variant {config.variant!r} would distil untrained "
                        "(random) teachers; name the weights, or set allow_random_teachers: true to do it knowingly")
    kd_head = "discriminative" in used and config.stage2.kd_weight > 0
    if kd_head and m.discriminative_teacher_head is None:
        problems.append("models.discriminative_teacher_head is not set: stage2.kd_weight > 0 needs T_d's ArcFace "
                        "classifier, a state dict with 'weight' [num_classes, models.embedding_dim]")
    paths = [("data.train_root", config.data.train_root)] if need_data else []
    paths += [("data.teacher_cache", config.data.teacher_cache)]  # gdrd-fast cache-teachers writes it first
    paths += [(WEIGHT_KEYS[kind], _weights(config, kind)) for kind in used]
    paths += [("models.discriminative_teacher_head", m.discriminative_teacher_head)] if kd_head else []
    paths += [(f"eval.val_targets[{i}]", t) for i, t in enumerate(config.eval.val_targets)]
    for key, path in paths:
        if path is not None and not Path(path).exists():
            problems.append(f"{key}: no file or folder at {str(path)!r}")
    for key, package in _packages(config, used):
        if importlib.util.find_spec(package) is None:
            problems.append(f"{key} needs the package {package}, which is not installed")
    if problems:
        raise ValueError("; ".join(problems))


def _packages(config: TrainConfig, used: list[str]) -> list[tuple[str, str]]:
    """(config key, import name) of the optional packages the recipe needs."""
    m, needs = config.models, []
    if "generative" in used and m.generative_teacher in ("diffusers", "vae"):
        needs.append(("models.generative_teacher", "diffusers"))
    for kind in used:
        weights = _weights(config, kind)
        if weights is not None and str(weights).endswith(".safetensors"):
            needs.append((WEIGHT_KEYS[kind], "safetensors"))
    if config.eval.val_targets:
        needs.append(("eval.val_targets", "PIL"))
    return needs


def check_parts(config: TrainConfig, parts, stages: list[str], resume_state: dict | None = None,
                output_dir: str | os.PathLike | None = None) -> dict:
    """Build the teachers that the stages still to run use (stages: the variant's, resume_state: the
    checkpoint the run resumes from), and read every validation target, naming the key of what fails.
    Logs, and writes to output_dir/teachers.json, the teachers' weights and their SHA-256; returns that."""
    from ..data import read_pairs_bin
    if resume_state is not None and resume_state.get("stage") in stages:
        stages = stages[stages.index(resume_state["stage"]):]
    for kind in teachers_used(config.variant):
        if not any(s in stages for s in TEACHER_STAGES[kind]):
            continue
        try:
            getattr(parts, kind)()
        except (ValueError, OSError, TypeError, KeyError) as exc:
            message, key = " ".join(str(exc).split()), WEIGHT_KEYS[kind]
            named = any(k in message for k in ("models.", "stage2."))
            raise ValueError(message if named else f"{key}: {message}") from None
    for i, target in enumerate(config.eval.val_targets):
        try:
            read_pairs_bin(target)
        except (ValueError, OSError) as exc:
            raise ValueError(f"eval.val_targets[{i}]: {' '.join(str(exc).split())}") from None
    record = teacher_record(config)
    for kind, entry in record.items():
        log.info("teacher %s: %s", kind, entry["weights"] if entry["weights"] else "UNTRAINED (random weights; "
                 "allow_random_teachers is set)")
        if entry["weights"]:
            log.info("teacher %s sha256 %s", kind, entry["sha256"])
    if output_dir is not None:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "teachers.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def teacher_record(config: TrainConfig) -> dict:
    """Per teacher the variant uses: its weights key, path and SHA-256 (None, None: untrained)."""
    record = {}
    for kind in teachers_used(config.variant):
        weights = _weights(config, kind)
        entry = {"key": WEIGHT_KEYS[kind], "weights": weights, "sha256": None}
        if weights is not None:
            entry["sha256"] = file_sha256(weights)
        if kind == "discriminative" and config.stage2.kd_weight > 0 and config.models.discriminative_teacher_head:
            entry["head"] = config.models.discriminative_teacher_head
            entry["head_sha256"] = file_sha256(entry["head"])
        record[kind] = entry
    return record


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, or of every file of a folder (a diffusers save_pretrained folder) in name order."""
    digest, path = hashlib.sha256(), Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()

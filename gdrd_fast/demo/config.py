"""The demo recipe (gdrd_fast/configs/demo.yaml) as dataclasses; `quick` holds the --quick overrides."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..train.config import OptimConfig, Stage2Config, apply_overrides, from_dict, read_recipe, set_dotted


@dataclass
class SyntheticDataConfig:
    train_identities: int = 100
    images_per_identity: int = 16
    test_identities: int = 60  # disjoint from the training identities, as LFW is from CASIA
    test_images_per_identity: int = 8
    pairs_per_fold: int = 60  # 10 folds, half same-identity pairs


@dataclass
class DenoiserConfig:
    """The diffusion training that makes the generative teacher (a small diffusers UNet2DModel)."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(optimizer="adamw", lr=2e-3, weight_decay=0.0,
                                                                   epochs=1, milestones=[], steps=1000))
    batch_size: int = 32
    image_size: int = 32  # faces are resized to this for the UNet; the LR face too, in stage 1
    unet: dict[str, Any] = field(default_factory=dict)  # UNet2DModel kwargs
    tap: str = "down_blocks.2"
    train_timesteps: int = 1000
    timestep: int = 0  # the timestep the encoder is run at as a teacher (paper: 0)
    noise: float = 0.0  # noise std mixed into the teacher's input (paper: 0)


@dataclass
class AblationConfig:
    """What `gdrd-fast demo` compares (the grid of `gdrd-fast ablate`, at the recipe's resolution)."""
    variants: list[str] = field(default_factory=lambda: ["baseline", "crd", "crrcd", "gdrd", "gdrd-e2e"])
    seeds: int = 2
    checkpoint_every: int = 200  # steps between a cell's checkpoints (a stopped grid resumes from them)
    # verification-accuracy points a difference between two rows moved between torch builds and thread counts,
    # same seeds (measured, README "The demo"): a smaller difference is reported as within the noise
    build_spread: float = 0.0

    def __post_init__(self):
        from ..train.config import VARIANTS
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad or not self.variants:
            raise ValueError(f"ablation.variants must be among {VARIANTS}, got {self.variants}")
        if self.seeds < 1 or self.checkpoint_every < 0 or not self.build_spread >= 0:
            raise ValueError(f"need ablation.seeds >= 1, checkpoint_every >= 0 and build_spread >= 0, got "
                             f"{self.seeds}, {self.checkpoint_every}, {self.build_spread}")


@dataclass
class DemoConfig:
    name: str = "gdrd-demo"
    seed: int = 0  # the data and the teachers
    student_seed: int = 0  # a student's initialisation, batch order and draws (the ablation's seeds)
    image_size: int = 64  # HR side (docs/method/demo.md: 112 or 64)
    resolution: int = 16
    batch_size: int = 64
    width: int = 16  # SmallFaceNet width
    embedding_dim: int = 128
    backend: str = "auto"
    data: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    teacher: OptimConfig = field(default_factory=OptimConfig)  # the HR ArcFace teacher
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)
    stage1: OptimConfig = field(default_factory=OptimConfig)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    # baseline and CRD students train the whole network for stage1.steps + stage2.steps (the same budget)
    student: OptimConfig = field(default_factory=OptimConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)
    quick: dict[str, Any] = field(default_factory=dict)  # dotted key -> value, applied by --quick
    smoke: bool = False  # set by --quick: every output says its numbers come from a smoke run
    # the demo's teachers are trained here from scratch for a few hundred steps (--quick: a few), not the
    # paper's pretrained networks: a recipe must say that it accepts them (train/checks.py refuses otherwise)
    allow_random_teachers: bool = False

    def __post_init__(self):
        if not self.allow_random_teachers:
            raise ValueError("allow_random_teachers: the demo trains its own teachers from scratch (teacher.steps, "
                             "denoiser.optim.steps) instead of loading pretrained ones; set allow_random_teachers: "
                             "true in the recipe to run it")
        for name in ("teacher", "stage1"):
            if getattr(self, name).steps is None:
                raise ValueError(f"{name}.steps must be set in the demo recipe")
        if self.stage2.optim.steps is None:
            raise ValueError("stage2.optim.steps must be set in the demo recipe")

    @property
    def student_budget(self) -> OptimConfig:
        return dataclasses.replace(self.student, steps=self.stage1.steps + self.stage2.optim.steps)


def load_demo_config(name_or_path: str | Path = "demo", quick: bool = False,
                     overrides: Sequence[str] = ()) -> DemoConfig:
    data = read_recipe(name_or_path)
    if quick:
        for key, value in (data.get("quick") or {}).items():
            set_dotted(data, key, value)
        data["smoke"] = True
    return from_dict(DemoConfig, apply_overrides(data, overrides))

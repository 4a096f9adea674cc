"""Training recipes: YAML files mapped onto dataclasses (one file per recipe in gdrd_fast/configs/).

Unknown keys and wrongly typed values raise ValueError naming the key, so a typo never trains silently
with a default. `load_config(path, overrides)` applies "a.b=value" overrides (YAML-parsed values).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

RECIPES_DIR = Path(__file__).resolve().parent.parent / "configs"
AMP_MODES = ("none", "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw")
DISTILL_MODES = ("rcd", "crd", "none")
MISMATCH_RULES = ("refuse", "resize")
# What a run trains (see pipeline.variant_plan): GDRD module-wise (the paper), end to end, with stage 2
# also fine-tuning the backbone; one-stage students (CRRCD = ArcFace + KD + RCD, CRD, KD, no distillation);
# or stage 1 alone, its backbone judged by a linear probe on frozen features.
VARIANTS = ("gdrd", "gdrd-e2e", "gdrd-unfrozen", "crrcd", "crd", "kd", "baseline", "stage1-probe")
# the variants that distil the generative teacher T_g (the others never build it)
GENERATIVE_VARIANTS = ("gdrd", "gdrd-e2e", "gdrd-unfrozen", "stage1-probe")


@dataclass
class OptimizerConfig:
    """One optimizer: SGD (momentum) or AdamW (momentum is then beta1)."""
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError(f"need lr > 0, weight_decay >= 0 and momentum in [0, 1), got lr={self.lr}, "
                             f"weight_decay={self.weight_decay}, momentum={self.momentum}")


@dataclass
class OptimConfig(OptimizerConfig):
    """An optimizer with step decay; milestones and length in epochs (docs/method/training.md), or `steps` if set."""
    epochs: int = 36
    milestones: list[int] = field(default_factory=lambda: [21, 28, 32])
    gamma: float = 0.1
    steps: int | None = None  # overrides epochs (milestones then scale with steps / epochs)

    def __post_init__(self):
        super().__post_init__()
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be positive, got {self.steps}")


@dataclass
class DataConfig:
    train_root: str | None = None  # identity-folder tree, a .rec (+ .idx), or a folder holding train.rec
    image_size: int = 112
    resolution: int = 16  # the LR side; the student sees it upsampled back to image_size
    interpolation: str = "bilinear"
    antialias: bool = True
    batch_size: int = 96
    num_workers: int = 4
    flip: bool = True
    # a training image that is not RGB image_size x image_size: 'refuse' (one line naming it) or 'resize'
    # (converted to RGB and resized bilinearly with antialiasing)
    mismatch: str = "refuse"
    # a folder of the frozen teachers' outputs (gdrd-fast cache-teachers writes it; train reads it, checked
    # against this recipe); None: the teachers run at every step
    teacher_cache: str | None = None

    def __post_init__(self):
        if self.mismatch not in MISMATCH_RULES:
            raise ValueError(f"data.mismatch must be one of {MISMATCH_RULES}, got {self.mismatch!r}")


@dataclass
class ModelConfig:
    student: str = "r18"
    discriminative_teacher: str = "r50"
    discriminative_teacher_weights: str | None = None  # insightface checkpoint of T_d
    discriminative_teacher_head: str | None = None  # T_d's ArcFace classifier over the training ids (for KD)
    generative_teacher: str = "pgdiff"  # 'pgdiff' (guided-diffusion layout), 'diffusers' (UNet) or 'vae' (AutoencoderKL)
    generative_teacher_config: str | None = None  # diffusers: 'tiny' | 'pgdiff-like'; vae: 'tiny'
    generative_teacher_weights: str | None = None
    generative_teacher_tap: str | None = None  # None: the kind's default tap
    generative_teacher_input: int = 448  # the LR face is resized (bicubic, clamped to [-1, 1]) to this for T_g
    generative_teacher_timestep: int = 0  # the diffusion timestep T_g is run at (paper: 0)
    generative_teacher_noise: float = 0.0  # noise std mixed into T_g's input, variance preserving (paper: 0)
    embedding_dim: int = 512


@dataclass
class RelationalConfig:
    rel_dim: int = 128
    num_negatives: int = 512
    queue_size: int = 16384
    temperature: float = 0.1
    supervised: bool = True


@dataclass
class CRDConfig:
    feat_dim: int = 128
    nce_k: int = 16384
    nce_t: float = 0.07
    nce_m: float = 0.5
    sharded: bool = False  # under torchrun: each rank keeps 1/N of both banks (for very large n_data)


@dataclass
class Stage1Config:
    optim: OptimConfig = field(default_factory=OptimConfig)


@dataclass
class Stage2Config:
    """L = L_cls + kd_weight L_kd + distill_weight L_distill (CRRCD Eq. 13: 1, 0.5, 2)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    distill: str = "rcd"
    kd_weight: float = 0.5
    distill_weight: float = 2.0
    kd_temperature: float = 4.0
    arcface_scale: float = 64.0
    arcface_margin: float = 0.5
    rcd: RelationalConfig = field(default_factory=RelationalConfig)
    crd: CRDConfig = field(default_factory=CRDConfig)
    # its own optimizer for the distillation module's parameters (the critic), on the stage's schedule;
    # None: they train with the student's optimizer
    distill_optim: OptimizerConfig | None = None
    gen_weight: float = 1.0  # gdrd-e2e: weight of the stage-1 feature regression in the joint loss
    backbone_lr_factor: float = 0.1  # gdrd-unfrozen: the backbone's lr = this x the stage's lr

    def __post_init__(self):
        if self.distill not in DISTILL_MODES:
            raise ValueError(f"stage2.distill must be one of {DISTILL_MODES}, got {self.distill!r}")
        if not self.backbone_lr_factor > 0 or self.gen_weight < 0:
            raise ValueError(f"need stage2.backbone_lr_factor > 0 and stage2.gen_weight >= 0, got "
                             f"{self.backbone_lr_factor} and {self.gen_weight}")


@dataclass
class EvalConfig:
    """Verification during training (train/validation.py): every val_every steps of the stage that
    trains the student's output (stage 2) and at its end, on rank 0, at data.resolution."""
    val_targets: list[str] = field(default_factory=list)  # insightface pairs .bin files (lfw.bin, cfp_fp.bin, ...)
    val_every: int = 2000  # steps; 0: only at the end of the stage
    batch_size: int = 128

    def __post_init__(self):
        if self.val_every < 0 or self.batch_size < 1:
            raise ValueError(f"need eval.val_every >= 0 and eval.batch_size >= 1, got {self.val_every}, "
                             f"{self.batch_size}")


@dataclass
class TrainConfig:
    name: str = "gdrd"
    variant: str = "gdrd"  # one of VARIANTS
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    backend: str = "auto"  # kernel backend of the losses
    output_dir: str = "runs/gdrd"
    log_every: int = 50
    checkpoint_every: int = 1000
    sync_batchnorm: bool = False  # under torchrun on GPUs: batch statistics over the global batch
    # a variant that distils a teacher whose weights are not set is refused unless this is true
    allow_random_teachers: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelConfig = field(default_factory=ModelConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    @property
    def one_stage_optim(self) -> OptimConfig:
        return one_stage_budget(self.stage1.optim, self.stage2.optim)


def one_stage_budget(stage1: OptimConfig, stage2: OptimConfig) -> OptimConfig:
    """A one-stage student's schedule: stage 2's, stretched over both stages' length (the same budget)."""
    epochs = stage1.epochs + stage2.epochs
    steps = stage1.steps + stage2.steps if stage1.steps is not None and stage2.steps is not None else None
    milestones = [round(m * epochs / stage2.epochs) for m in stage2.milestones]
    return dataclasses.replace(stage2, epochs=epochs, steps=steps, milestones=milestones)


def _check_type(key: str, value, annotation):
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return value
        return _check_type(key, value, next(a for a in args if a is not type(None)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{key} must be a mapping, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{key} must be a list, got {value!r}")
        return [_check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool) and type(value) is not annotation:
        raise ValueError(f"{key} must be {annotation.__name__}, got {value!r}")
    return value


def _dataclass_of(hint):
    """The dataclass a field holds (X, or X | None), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    inner = [a for a in typing.get_args(hint) if a is not type(None)]
    return inner[0] if len(inner) == 1 and dataclasses.is_dataclass(inner[0]) else None


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from nested dicts; unknown keys and wrong types raise ValueError."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)}; "
                         f"known: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        nested = _dataclass_of(hint)
        if nested is not None and value is not None:
            kwargs[name] = from_dict(nested, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, value, hint)
    return cls(**kwargs)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def set_dotted(data: dict, key: str, value) -> None:
    """data['a']['b'] = value for key 'a.b', creating sections as needed."""
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"override {key!r}: {part!r} is not a section")
    node[leaf] = value


def apply_overrides(data: dict, overrides: typing.Sequence[str]) -> dict:
    """Apply "a.b=value" strings (values parsed as YAML) to nested dicts, in order."""
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override must look like key.sub=value, got {override!r}")
        key, raw = override.split("=", 1)
        set_dotted(data, key, yaml.safe_load(raw))
    return data


def recipe_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a packaged recipe ('paper', 'demo')."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        return path
    packaged = RECIPES_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise ValueError(f"no recipe named {name_or_path!r}; packaged recipes: {', '.join(names)}")
    return packaged


def read_recipe(name_or_path: str | Path) -> dict:
    with open(recipe_path(name_or_path)) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{name_or_path}: a recipe must be a mapping of keys, got {type(data).__name__}")
    return data


def load_config(name_or_path: str | Path = "paper", overrides: typing.Sequence[str] = ()) -> TrainConfig:
    return from_dict(TrainConfig, apply_overrides(read_recipe(name_or_path), overrides))

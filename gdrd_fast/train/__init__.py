"""Two-stage GDRD training: config (YAML -> dataclasses), stages, the loop, checkpoints, runtime."""
from .checkpoint import load_checkpoint, save_checkpoint
from .config import TrainConfig, OptimConfig, load_config
from .loop import Trainer, log_to_file
from .runtime import Runtime, seed_everything
from .stages import DiscriminativeStage, GenerativeStage, Stage, Views, kd_loss

__all__ = ["TrainConfig", "OptimConfig", "load_config", "Trainer", "log_to_file", "Runtime", "seed_everything",
           "Stage", "GenerativeStage", "DiscriminativeStage", "Views", "kd_loss", "load_checkpoint",
           "save_checkpoint"]

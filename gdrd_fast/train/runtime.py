"""Where the run executes: device, process rank and precision, in one place (torchrun sets the rank)."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from ..distributed.launch import init_from_env

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    amp: str = "none"
    rank: int = 0
    world_size: int = 1

    @classmethod
    def create(cls, device: str = "auto", amp: str = "none") -> "Runtime":
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        dev = torch.device(device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA device is available")
        if amp not in ("none", *_AMP_DTYPES):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {amp!r}")
        dev, rank, world_size = init_from_env(dev)  # started by torchrun: join the process group
        return cls(dev, amp, rank, world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Mixed precision for the networks; losses run outside it, in fp32 (see stages.py)."""
        if self.amp == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=_AMP_DTYPES[self.amp])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 only; a disabled scaler is a no-op that still round-trips its state."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)

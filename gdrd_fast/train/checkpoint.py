"""Training checkpoints: atomic, SHA-256-verified files (gdrd_fast.models.checkpoints) that load with
torch.load(weights_only=True); RNG states are stored as tensors."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from ..models.checkpoints import read_checkpoint, write_checkpoint


def rng_state() -> dict:
    """Every RNG the training loop draws from, as tensors and plain Python values."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": (int(np_state[3]), float(np_state[4])),
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        if not torch.cuda.is_available() or torch.cuda.device_count() < len(state["cuda"]):
            raise ValueError(f"checkpoint holds {len(state['cuda'])} CUDA RNG state(s) but this machine has "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} CUDA device(s)")
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    has_gauss, gauss = state["numpy_gauss"]
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         has_gauss, gauss))


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Never a half-written file: see write_checkpoint."""
    return write_checkpoint(state, path)


def load_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """A checkpoint written by save_checkpoint; CorruptCheckpointError if its bytes are not what was written."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    return read_checkpoint(path, map_location)


def shard_path(path: str | os.PathLike, rank: int) -> Path:
    """Where rank `rank` keeps its shard of a sharded state beside the checkpoint at `path`."""
    path = Path(path)
    return path.with_name(f"{path.name}.rank{rank}")


def load_shards(path: str | os.PathLike, map_location="cpu") -> list[dict]:
    """Every rank's shard file of the checkpoint at `path`, in rank order ([] if it has none)."""
    shards = []
    while shard_path(path, len(shards)).is_file():
        shards.append(load_checkpoint(shard_path(path, len(shards)), map_location))
    return shards


def remove_shards(path: str | os.PathLike, first_rank: int = 0) -> None:
    """Delete the shard files of ranks >= first_rank (left by an earlier save with more ranks)."""
    rank = first_rank
    while shard_path(path, rank).is_file():
        shard_path(path, rank).unlink()
        rank += 1

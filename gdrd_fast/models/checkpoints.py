"""Reading pretrained weights from local files: safe loading, prefix stripping, exact key matching."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import Tensor, nn

def read_state_dict(source, *, what: str = "weights") -> dict[str, Tensor]:
    """A state dict from a mapping or a local file (.safetensors, or a torch file read with weights_only=True)."""
    if isinstance(source, Mapping):
        state = dict(source)
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{what}: no file at {path!r}")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file  # comes with diffusers / huggingface_hub
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, Mapping):
            raise ValueError(f"{what}: {path!r} holds a {type(state).__name__}, not a state dict")
        state = dict(state)
    else:
        raise TypeError(f"{what} must be a path or a state dict, got {type(source).__name__}")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{what}: not a state dict of tensors (entries {bad[:5]!r} are not str -> Tensor)")
    return state


def strip_prefix(state: Mapping[str, Tensor], prefix: str = "module.") -> dict[str, Tensor]:
    """Drop `prefix` (DataParallel / DDP wrappers save 'module.'-prefixed keys) where present."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def _listing(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:8])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")


def load_exact(module: nn.Module, state: Mapping[str, Tensor], *, what: str) -> nn.Module:
    """load_state_dict(strict=True), checked first so a failure names every bad key and leaves `module` as it was."""
    own = module.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    wrong_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                   for k in own.keys() & state.keys() if state[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatches: {_listing(wrong_shape)}")
    if problems:
        raise ValueError(f"{what} do not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module

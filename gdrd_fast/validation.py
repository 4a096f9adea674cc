"""Argument checks shared by every public entry point (ops.md section 6).

Shape, dtype and device checks are free. Value checks (index range, NaN/Inf, unset Z) read tensor
values: they run on CPU tensors in eager mode and, on GPU, only after `set_checks(True)`, since they sync.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
REDUCTIONS = ("mean", "sum", "none")
_checks_on_gpu = False


def set_checks(enabled: bool) -> None:
    """Also run value checks (index range, NaN/Inf) on GPU tensors; they cost a host sync."""
    global _checks_on_gpu
    _checks_on_gpu = bool(enabled)


def value_checks(t: Tensor) -> bool:
    # inside torch.compile a value check would be a data-dependent graph break: skip it there
    if torch.compiler.is_compiling():
        return False
    return t.device.type == "cpu" or _checks_on_gpu


def tensor(name: str, t, ndim: int | tuple[int, ...], dtypes=FLOAT_DTYPES) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dimensions, "
                         f"got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has unsupported dtype {t.dtype}; expected one of "
                        + ", ".join(str(d).replace('torch.', '') for d in dtypes))
    if t.dim() > 0 and t.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    return t


def all_finite(t: Tensor) -> bool:
    """One reduction instead of an elementwise pass: a finite sum proves every element finite (NaN and Inf
    survive any order of additions); only a non-finite sum, which may be an overflow, pays the exact check."""
    acc = torch.float64 if t.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(t.sum(dtype=acc))) or bool(torch.isfinite(t).all())


def finite(name: str, t: Tensor) -> None:
    if value_checks(t) and not all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf")


def same_device(**tensors: Tensor | None) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        raise ValueError("all tensors must be on one device, got "
                         + ", ".join(f"{k} on {v.device}" for k, v in present.items()))
    return next(iter(devices))


def same_size(what: str, **sizes: int) -> None:
    if len(set(sizes.values())) > 1:
        raise ValueError(f"mismatched {what}: " + ", ".join(f"{k}={v}" for k, v in sizes.items()))


def index_in_range(name: str, idx: Tensor, n: int) -> None:
    if value_checks(idx) and idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} has values in [{lo}, {hi}], outside [0, {n - 1}]")


def positive(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def log_z_value(name: str, log_z, like: Tensor) -> Tensor:
    """log Z as a 0-dim tensor on `like`'s device; NaN means CRD's normaliser was never estimated."""
    if log_z is None:
        raise ValueError(f"{name} is required: estimate it first (crd_log_z / relational_log_z)")
    t = torch.as_tensor(log_z, device=like.device)
    if t.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    if value_checks(t) and not bool(torch.isfinite(t)):
        raise ValueError(f"{name} is not set (got {float(t)}): Z has not been estimated yet")
    return t.reshape(())

"""Argument checks shared by every public entry point and Module.

Every check runs before anything is computed, drawn or written, so a failed call changes nothing, and
every message names the caller's own argument and what it must be.

Shape, dtype, device and grad checks are free and always run; a call whose tensors have the structure of
one that passed them skips them (structure_checked). Value checks (index range, NaN/Inf, an
unset log Z) read tensor values: they run on CPU tensors in eager mode and, on GPU, only after
`set_checks(True)`, since each costs a host sync. Inside torch.compile they are skipped.

NaN policy, the same for every op: every floating-point tensor a call reads (inputs, banks, queues,
weights, biases, relational parameters, log Z) must be finite. Where value checks run, a NaN or Inf
raises ValueError naming the tensor; where they do not (GPU without set_checks(True), compiled code),
it propagates into the loss, which is then NaN, never silently dropped.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from . import backends

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int32, torch.int64)
REDUCTIONS = ("mean", "sum", "none")
_checks_on_gpu = False


def set_checks(enabled: bool) -> None:
    """Also run value checks (index range, NaN/Inf) on GPU tensors; they cost a host sync."""
    global _checks_on_gpu
    _checks_on_gpu = bool(enabled)


def structure_checked(cache: dict, checks: Callable[[], object], *tensors: Tensor | None, extra: tuple = ()):
    """checks() (a call's shape, dtype, device and grad checks over `tensors`, which raises for a bad call),
    or what it returned before for tensors of exactly this structure: each one's dtype, device,
    requires_grad and sizes, or None (gdrd_fast._C.signature, csrc/python/host.cpp), and the grad mode.
    A failing structure is never cached, so its error is raised each time. What the checks read besides
    the tensors must be in `extra` (hashable: a Module's sizes and backends) or checked outside (scalars,
    value checks). `cache`: one dict per check function."""
    key = None
    # compiled code runs the checks as traced Python (its guards then hold the structure)
    signature = None if torch.compiler.is_compiling() else backends.host_function("signature")
    if signature is not None:
        packed = signature(*tensors)  # None where an argument is not a tensor: the checks then name it
        if packed is not None:
            key = (packed, torch.is_grad_enabled(), extra)
            result = cache.get(key, _MISSING)
            if result is not _MISSING:
                return result
    result = checks()
    if key is not None:
        if len(cache) >= _STRUCTURES_KEPT:
            cache.clear()
        cache[key] = result
    return result


_MISSING = object()
_STRUCTURES_KEPT = 256  # per check function: a training loop repeats a handful of structures


def value_checks(t: Tensor) -> bool:
    # inside torch.compile a value check would be a data-dependent graph break: skip it there
    if torch.compiler.is_compiling():
        return False
    return t.is_cpu or _checks_on_gpu  # is_cpu: a third of the host time of t.device.type


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
    """A CPU tensor: the C++ check, one read (gdrd_fast._C.first_non_finite). Otherwise one reduction instead
    of an elementwise pass: a finite sum proves every element finite (NaN and Inf survive any order of
    additions); only a non-finite sum, which may be an overflow (more likely in a half-precision sum), pays
    the exact check."""
    scan = backends.host_function("first_non_finite") if t.is_cpu else None
    bad = scan(t) if scan is not None else None
    if bad is not None:
        return bad < 0
    # .item() and math.isfinite: a third of the host time of torch.isfinite on a 0-dim tensor
    return math.isfinite(t.sum().item()) or bool(torch.isfinite(t).all())


def finite(name: str, t: Tensor | None) -> None:
    if t is not None and value_checks(t) and not all_finite(t):
        raise ValueError(f"{name} contains NaN or Inf")


def finite_each(names: tuple[str, ...], tensors: tuple[Tensor | None, ...]) -> None:
    """finite() of every tensor (None: absent), for tensors on one device: on the CPU one C++ call for all
    (gdrd_fast._C.first_non_finite, csrc/python/host.cpp)."""
    present = [t for t in tensors if t is not None]
    if not present or not value_checks(present[0]):
        return
    scan = backends.host_function("first_non_finite") if present[0].is_cpu else None
    bad = scan(*present) if scan is not None else None
    if bad is None:
        for name, t in zip(names, tensors):
            finite(name, t)
    elif bad >= 0:
        raise ValueError(f"{[n for n, t in zip(names, tensors) if t is not None][bad]} contains NaN or Inf")


def no_grad_input(name: str, t: Tensor, why: str) -> None:
    """Tensors that never receive a gradient must not ask for one: silently detaching them would hide a bug."""
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad, but {why}, so no gradient reaches it: pass {name}.detach()")


def shape(name: str, t: Tensor, expected: tuple[int, ...], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}{' ' + what if what else ''}, "
                         f"got {tuple(t.shape)}")


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
        lo, hi = (int(v) for v in idx.aminmax())
        if lo < 0 or hi >= n:
            raise ValueError(f"{name} has values in [{lo}, {hi}], outside [0, {n - 1}]")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive(name: str, value: float) -> float:
    if not _is_number(value) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def non_negative(name: str, value: float) -> float:
    if not _is_number(value) or not value >= 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def positive_int(name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def in_unit_interval(name: str, value: float) -> float:
    """A momentum: 0 <= value < 1."""
    if not _is_number(value) or not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")
    return float(value)


def float_dtype(name: str, value) -> torch.dtype:
    if value not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point dtype ("
                        + ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES) + f"), got {value!r}")
    return value


def reduction(value: str) -> str:
    if value not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {value!r}")
    return value


def all_at_once(owner: str, *checks) -> None:
    """Run every check (a zero-argument callable) and raise one error listing all that failed, so a
    constructor reports every bad argument in one go."""
    errors = []
    for run in checks:
        try:
            run()
        except (ValueError, TypeError) as exc:
            if str(exc) not in errors:
                errors.append(str(exc))
    if errors:
        raise ValueError(f"{owner}: " + "; ".join(errors))


def log_z_value(name: str, log_z, like: Tensor) -> Tensor:
    """log Z as a 0-dim float64 tensor on `like`'s device (a Python float keeps its float64 value).

    log Z is a frozen normaliser on every backend: no gradient flows to it, so a tensor that requires
    grad is refused. NaN means the normaliser was never estimated."""
    if log_z is None:
        raise ValueError(f"{name} is required: estimate it first (crd_log_z / relational_log_z)")
    if isinstance(log_z, Tensor):
        if log_z.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(log_z.shape)}")
        if log_z.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"{name} must be a real number, got dtype {log_z.dtype}")
        no_grad_input(name, log_z, "log Z is a frozen normaliser (estimate it with crd_log_z / relational_log_z)")
        # a host (CPU) number may go to any device; a tensor on another accelerator, or one without data
        # (meta), is a mistake to name rather than copy
        if log_z.device != like.device and log_z.device.type != "cpu":
            raise ValueError(f"{name} is on {log_z.device}, the other tensors on {like.device}: "
                             f"pass a float or a tensor on {like.device}")
        t = (log_z if log_z.dim() == 0 and log_z.dtype == torch.float64 and log_z.device == like.device
             else log_z.reshape(()).to(like.device, torch.float64))
    elif _is_number(log_z):
        t = torch.tensor(float(log_z), dtype=torch.float64, device=like.device)
    else:
        raise TypeError(f"{name} must be a float or a one-element tensor, got {type(log_z).__name__}")
    if value_checks(t) and not bool(torch.isfinite(t)):
        raise ValueError(f"{name} is not set (got {float(t)}): Z has not been estimated yet")
    return t

"""Backend discovery and dispatch: which compiled parts loaded, and which backend a call gets.

Nothing here raises at import: a missing extension or Triton only makes its backend unavailable,
and asking for it by name explains what is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
_KERNELS_SOURCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")


@lru_cache(None)
def _load(module: str):
    """(module, None) or (None, reason) for an optional compiled part."""
    try:
        return importlib.import_module(module), None
    except Exception as exc:  # a broken build must not break `import gdrd_fast`
        return None, f"{type(exc).__name__}: {exc}"


def cpu_extension():
    """The C++ CPU extension (registers torch.ops.gdrd_fast_C CPU kernels), or None."""
    return _load("gdrd_fast._C")[0]


def cuda_extension():
    """The CUDA extension (registers torch.ops.gdrd_fast_C CUDA kernels), or None."""
    if cpu_extension() is None:  # the schemas live in _C
        return None
    return _load("gdrd_fast._C_cuda")[0]


def extension_error(name: str) -> str | None:
    return _load(name)[1]


def interpreter_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(None)
def triton_version() -> str | None:
    try:
        import triton
        return triton.__version__
    except Exception:
        return None


@lru_cache(None)
def kernels():
    """The Triton kernel package: gdrd_fast.kernels when installed, else kernels/ of a source checkout."""
    if os.path.isfile(os.path.join(_KERNELS_SOURCE, "__init__.py")):
        if "gdrd_fast.kernels" not in sys.modules:
            spec = importlib.util.spec_from_file_location(
                "gdrd_fast.kernels", os.path.join(_KERNELS_SOURCE, "__init__.py"),
                submodule_search_locations=[_KERNELS_SOURCE])
            module = importlib.util.module_from_spec(spec)
            sys.modules["gdrd_fast.kernels"] = module
            spec.loader.exec_module(module)
        return sys.modules["gdrd_fast.kernels"]
    return importlib.import_module("gdrd_fast.kernels")


# --- availability checks: None when usable on `device`, else the reason -------------------------------
def on_cpu(device: torch.device) -> str | None:
    return None if device.type == "cpu" else f"the 'cpu' backend needs CPU tensors, got {device}"


def with_cpu_extension(device: torch.device) -> str | None:
    if on_cpu(device) is not None:
        return on_cpu(device)
    if cpu_extension() is None:
        return ("built without the C++ CPU extension (gdrd_fast._C): reinstall with a C++ compiler, "
                f"`pip install -e . --no-build-isolation` ({extension_error('gdrd_fast._C')})")
    return None


def with_cuda_extension(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"the 'cuda' backend needs CUDA tensors, got {device}"
    if cuda_extension() is None:
        return ("built without CUDA extension: reinstall with nvcc and GDRD_BUILD_CUDA=1 "
                f"({extension_error('gdrd_fast._C_cuda') or extension_error('gdrd_fast._C')})")
    return None


def with_triton(device: torch.device) -> str | None:
    if triton_version() is None:
        return "triton is not installed: pip install triton"
    if device.type == "cuda" or (device.type == "cpu" and interpreter_mode()):
        return None
    return f"the 'triton' backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device}"


@dataclass(frozen=True)
class Impl:
    """One backend of one op: a loader for its function (imported on first use) and its availability."""
    load: Callable[[], Callable]
    unavailable: Callable[[torch.device], str | None]


def resolve(op: str, impls: dict[str, Impl], backend: str, device: torch.device) -> str:
    """The backend a call runs on: 'torch' means the reference; others index `impls`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        preference = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
        for name in preference:
            if name in impls and impls[name].unavailable(device) is None:
                return name
        return "torch"
    if backend not in impls:
        raise ValueError(f"{op} has no {backend!r} backend (available: 'torch', "
                         + ", ".join(repr(k) for k in impls) + ")")
    reason = impls[backend].unavailable(device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {reason}")
    return backend


def available_backends(impls: dict[str, Impl], device: torch.device) -> list[str]:
    return ["torch"] + [k for k, v in impls.items() if v.unavailable(device) is None]


def with_compiled_op(op: str, extension_check: Callable[[torch.device], str | None]):
    """Availability of torch.ops.gdrd_fast_C.<op>: the extension check, then that the op was compiled in."""

    def unavailable(device: torch.device) -> str | None:
        reason = extension_check(device)
        if reason is None and not hasattr(torch.ops.gdrd_fast_C, op):
            reason = f"this build of gdrd_fast._C has no op {op!r}: rebuild with `pip install -e . --no-build-isolation`"
        return reason

    return unavailable

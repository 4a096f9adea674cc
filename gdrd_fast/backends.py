"""Backend discovery and dispatch: which compiled parts loaded, and which backend a call gets.

Nothing here raises at import: a missing extension or Triton only makes its backend unavailable,
and asking for it by name explains what is missing.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
from torch import Tensor

BACKENDS = ("auto", "triton", "cuda", "cpu", "chunked", "torch")
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
def with_cpu_extension(device: torch.device) -> str | None:
    if device.type != "cpu":
        return f"the 'cpu' backend needs CPU tensors, got {device}"
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


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def anywhere(device: torch.device) -> str | None:
    return None


def dispatch_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype a call computes in, for dispatch: float64 if any input is, the inputs' dtype when they
    agree, else float32 (mixed inputs run an fp32 product)."""
    dtypes = {t.dtype for t in tensors if t is not None}
    if torch.float64 in dtypes:
        return torch.float64
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


@dataclass(frozen=True)
class Backend:
    """One implementation of one op, and everything it supports (declared, as xformers' operators do).

    load: the op's per-row function (one signature per op, the reference's), imported on first use.
    unavailable(device): None when its compiled parts are there and it runs on `device`, else why not.
    dtypes: the dtypes it computes itself. max_sizes(dtype): the largest size of each named dimension it
    takes. kernel: what the op's custom op calls for this backend (None for the reference).
    one_block: the whole loss (reduction folded in) of an eager call small enough for one C++ autograd node,
    taking the functional's arguments and returning None where it does not apply (csrc/autograd/).
    """
    load: Callable[[], Callable]
    unavailable: Callable[[torch.device], str | None]
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    max_sizes: Callable[[torch.dtype], dict[str, int]] | None = None
    kernel: Callable[[], Callable] | None = None
    one_block: Callable[..., Tensor | None] | None = None

    def limits(self, dtype: torch.dtype) -> dict[str, int]:
        return self.max_sizes(dtype) if self.max_sizes is not None and dtype in self.dtypes else {}

    def not_supported_reasons(self, device: torch.device, dtype: torch.dtype, **sizes: int) -> list[str]:
        """Every reason this backend does not run inputs on `device` of `dtype` and `sizes` ([]: it runs them)."""
        reasons = []
        missing = self.unavailable(device)
        if missing is not None:
            reasons.append(missing)
        if dtype not in self.dtypes:
            reasons.append(f"it computes {', '.join(str(d) for d in self.dtypes)}, not {dtype}")
        reasons += [f"{k}={sizes[k]} > {v}, its largest" for k, v in self.limits(dtype).items()
                    if k in sizes and sizes[k] > v]
        return reasons


# the device's preference order for backend="auto"; the op's exact backend when none is available
AUTO = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "chunked")}
_OPS: dict[str, "Op"] = {}


class Op:
    """The backends of one op and the one rule that picks a backend for a call.

    `exact` names the backend that runs on every device and dtype (the reference, or the chunked torch
    stream): it takes the inputs that the chosen backend does not support by dtype or size.
    `aliases`: old backend names still accepted, with a DeprecationWarning ('cpu' where it meant the
    chunked path).
    `reference_below`: under 'auto' on the CPU, a call whose `work` (the elements of the dense block the
    reference holds) is at most this runs the reference ('torch'): on a small call its native autograd costs
    the host less than the fused path's Python autograd.Function (docs/performance, host cost), and the
    block it holds is small. 0: never.
    """

    def __init__(self, name: str, backends: dict[str, Backend], exact: str = "torch",
                 aliases: dict[str, str] | None = None, reference_below: int = 0):
        self.name, self.backends, self.exact = name, backends, exact
        self.aliases = aliases or {}
        self.reference_below = reference_below
        self._loaded: dict[tuple, Callable] = {}
        _OPS[name] = self

    def __getitem__(self, backend: str) -> Backend:
        return self.backends[self.aliases.get(backend, backend)]

    def __contains__(self, backend: str) -> bool:
        return backend in self.backends or backend in self.aliases

    def check_name(self, backend: str) -> str:
        """The backend name that `backend` means for this op (checked where a Module is built, before any call)."""
        if backend in self.aliases:
            warnings.warn(f"{self.name}: backend={backend!r} is deprecated, use {self.aliases[backend]!r}",
                          DeprecationWarning, stacklevel=3)
            return self.aliases[backend]
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend != "auto" and backend not in self.backends:
            raise ValueError(f"{self.name} has no {backend!r} backend (it has: "
                             + ", ".join(repr(k) for k in self.backends) + ")")
        return backend

    def resolve(self, backend: str, device: torch.device, dtype: torch.dtype, work: int | None = None,
                **sizes: int) -> str:
        """The backend that runs this call. `auto` takes its pick, or `exact` where the pick does not support
        the dtype or sizes, or the reference for a small CPU call (`reference_below`); a backend named
        explicitly runs, or raises ValueError with every reason it cannot. Decided once per (op, backend,
        device type, dtype) outside torch.compile's graph, so a compiled step neither imports nor breaks the
        graph; size limits are plain comparisons."""
        kind = device_type(device)
        if work is not None and work <= self.reference_below and backend == "auto" and kind == "cpu":
            return "torch"
        chosen, limits = _choose(self.name, backend, kind, dtype)
        for k, v in limits:
            if sizes.get(k, 0) > v:
                if backend != "auto":
                    self.refuse(chosen, device, dtype, sizes)
                return self.exact
        return chosen

    def load_for(self, backend: str, device: torch.device, dtype: torch.dtype) -> Callable:
        """The loaded function of the backend resolve() picks for a call that no size limit concerns (the
        memory ops), kept per (backend, device, dtype) in eager mode: an in-place update of a few
        microseconds then pays one dict lookup for its dispatch, not the resolution."""
        if torch.compiler.is_compiling():  # traced once: no cache for the graph to guard on
            return self[self.resolve(backend, device, dtype)].load()
        key = (backend, device, dtype)
        run = self._loaded.get(key)
        if run is None:
            run = self._loaded[key] = self[self.resolve(backend, device, dtype)].load()
        return run

    def refuse(self, backend: str, device: torch.device, dtype: torch.dtype, sizes: dict[str, int]):
        """Raise the reasons a backend named explicitly cannot run a call."""
        reasons = self.backends[backend].not_supported_reasons(device, dtype, **sizes)
        raise ValueError(f"{self.name}: backend {backend!r} cannot run this call: {'; '.join(reasons)} "
                         f"(backend='auto' runs it on {self.exact!r})")

    def explain(self, backend: str, device: torch.device, dtype: torch.dtype,
                **sizes: int) -> tuple[str | None, list[str]]:
        """(the backend resolve() picks, or None where the one named explicitly cannot run the call; why the
        one asked for, or each of auto's candidates, was passed over)."""
        name = self.check_name(backend)
        asked = [n for n in AUTO.get(device.type, ()) if n in self.backends] if name == "auto" else [name]
        why = [f"{n}: {r}" for n in asked for r in self.backends[n].not_supported_reasons(device, dtype, **sizes)]
        try:
            return self.resolve(backend, device, dtype, **sizes), why
        except ValueError:
            return None, why

    def available(self, device: torch.device) -> list[str]:
        return [k for k, v in self.backends.items() if v.unavailable(device) is None]


def op(name: str) -> Op:
    """The backends of the op of that name (every Op registers itself when its module loads)."""
    return _OPS[name]


def ops() -> dict[str, Op]:
    """Every registered op, by name (importing gdrd_fast.functional registers them all)."""
    return dict(_OPS)


def forget_decisions() -> None:
    """Empty every cached dispatch decision and loaded function (after a backend table changes)."""
    _choose_cached.cache_clear()
    for table in _OPS.values():
        table._loaded.clear()


def device_type(device: torch.device) -> str:
    """device.type, kept per device in eager mode: the property formats a new string on each read, which
    costs about 5 us when it runs between autograd calls (measured beside a feature-regression step)."""
    if torch.compiler.is_compiling():
        return device.type
    kind = _DEVICE_TYPES.get(device)
    if kind is None:
        kind = _DEVICE_TYPES[device] = device.type
    return kind


_DEVICE_TYPES: dict[torch.device, str] = {}


@torch.compiler.assume_constant_result
def _choose(op_name: str, backend: str, device_type: str, dtype: torch.dtype) -> tuple:
    return _choose_cached(op_name, backend, device_type, dtype)


@lru_cache(None)
def _choose_cached(op_name: str, backend: str, device_type: str, dtype: torch.dtype) -> tuple:
    """(backend to run, its size limits as ((dimension, largest), ...)): the exact backend when it does not
    compute dtype."""
    op = _OPS[op_name]
    backend = op.check_name(backend)
    device = torch.device(device_type)
    explicit = backend != "auto"
    if backend == "auto":
        usable = [n for n in AUTO.get(device_type, ()) if n in op.backends and op[n].unavailable(device) is None]
        backend = usable[0] if usable else op.exact
    else:
        reason = op[backend].unavailable(device)
        if reason is not None:
            raise RuntimeError(f"{op_name}: backend {backend!r} is unavailable: {reason}")
    chosen = op[backend]
    if dtype not in chosen.dtypes:
        if explicit:
            op.refuse(backend, device, dtype, {})
        return op.exact, ()
    return backend, tuple(chosen.limits(dtype).items())


@lru_cache(None)
def compiled_op(op: str):
    """torch.ops.gdrd_fast_C.<op>.default (an autograd node for eager CPU calls), or
    None in a build without it; looked up once: a small call pays one cached lookup, not an attribute walk."""
    if cpu_extension() is None or not hasattr(torch.ops.gdrd_fast_C, op):
        return None
    return getattr(torch.ops.gdrd_fast_C, op).default


@lru_cache(None)
def host_function(name: str):
    """gdrd_fast._C.<name>, a CPython helper of the Python layer (csrc/python/host.cpp), or None in a build
    without it: the caller then does the same in torch."""
    return getattr(cpu_extension(), name, None)


# the reduction codes of the C++ autograd nodes (csrc/ops.cpp)
REDUCTION_CODES = {"none": 0, "mean": 1, "sum": 2}
# the largest dense block (elements) a small CPU call computes through the reference (Op.reference_below): at
# the host-cost benchmark's sizes the reference's native autograd costs the host about half the fused paths'
# autograd.Functions, and a block this small costs nothing to hold
SMALL_CALL_ELEMENTS = 1 << 14


def with_compiled_op(op: str, extension_check: Callable[[torch.device], str | None]):
    """Availability of torch.ops.gdrd_fast_C.<op>: the extension check, then that the op was compiled in."""

    def unavailable(device: torch.device) -> str | None:
        reason = extension_check(device)
        if reason is None and not hasattr(torch.ops.gdrd_fast_C, op):
            reason = f"this build of gdrd_fast._C has no op {op!r}: rebuild with `pip install -e . --no-build-isolation`"
        return reason

    return unavailable

"""Pieces shared by the Triton kernels: the tensor-core product, the rule for when it runs in fp32, and the
choice of a tile table by the installed Triton version.

Every kernel module keeps its tiles in one table named TILES: {first Triton version: {key: tiles}}, where
the tiles are a frozen dataclass. `for_installed_triton(TILES)` picks the entry of the newest version
not above the installed one; the launchers and the module's STATIC_CONFIGS (the static sm_90 / sm_80
checks) both read that entry, so CI compiles exactly what a launch on that Triton would pick.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

import torch
import triton
import triton.language as tl

T = TypeVar("T")
ARCHS = (90, 80)  # what the static checks compile for: Hopper (wgmma) and Ampere


@dataclass(frozen=True)
class StaticConfig:
    """One launch a kernel module can make: the kernel, its argument types and compile-time constants.

    `signature` maps runtime arguments to Triton types ("*bf16", "i32", "fp32", ...). `mma` is the operand
    type its tensor-core products must use in the PTX ("bf16", "f16", "tf32"), or None for a kernel
    without tl.dot; `expect_wgmma` whether its sm_90 PTX must use Hopper's wgmma (tiles of at least 64
    rows). `archs` are the architectures whose launcher picks this configuration.
    """
    name: str
    fn: object
    signature: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    mma: str | None
    expect_wgmma: bool
    archs: tuple[int, ...] = ARCHS


@triton.jit
def mma(a, b, DOT_IN_FP32: tl.constexpr):
    """a @ b with fp32 accumulation; DOT_IN_FP32 runs three TF32 MMAs (fp32 accuracy) on fp32 operands."""
    if DOT_IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    return tl.dot(a, b.to(a.dtype))


def interpreter_mode() -> bool:
    """TRITON_INTERPRET=1: kernels run in Triton's numpy interpreter (read by Triton at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_in_fp32(*dtypes: torch.dtype) -> bool:
    """Whether tensor-core products of operands stored in `dtypes` run at fp32 accuracy: fp32 (or mixed)
    operands, and bf16 in the interpreter, whose bf16 tl.dot returns garbage (its operands stay bf16 in
    memory, so the rounding is the same as on a GPU)."""
    kinds = set(dtypes)
    if kinds == {torch.float16}:
        return False
    if kinds == {torch.bfloat16}:
        return interpreter_mode()
    return True


@functools.lru_cache(None)
def triton_version() -> tuple[int, int]:
    major, minor = triton.__version__.split(".")[:2]
    return int(major), int(minor)


def for_installed_triton(table: Mapping[tuple[int, int], T]) -> T:
    """The entry of `table` ({first Triton version: value}) that applies to the installed Triton."""
    applicable = [version for version in table if version <= triton_version()]
    if not applicable:
        raise RuntimeError(f"triton {triton.__version__} is older than every tile table entry "
                           f"({', '.join('.'.join(map(str, v)) for v in sorted(table))})")
    return table[max(applicable)]


@functools.lru_cache(None)
def device_arch(device: torch.device) -> int:
    """The configuration family of a device: 90 for Hopper and newer, 80 otherwise (and for the interpreter)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return 90
    return 80

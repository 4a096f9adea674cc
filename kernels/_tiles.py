"""Pieces shared by the Triton kernels: the tensor-core product and the rule for when it runs in fp32."""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from gdrd_fast.backends import interpreter_mode


@triton.jit
def mma(a, b, IN_FP32: tl.constexpr):
    """a @ b with fp32 accumulation; IN_FP32 runs three TF32 MMAs (fp32 accuracy) on fp32 operands."""
    if IN_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="tf32x3")
    return tl.dot(a, b.to(a.dtype))


def mma_in_fp32(*tensors: torch.Tensor) -> bool:
    """fp32 (or mixed) operands, and bf16 in the interpreter, whose bf16 tl.dot returns garbage."""
    dtypes = {t.dtype for t in tensors}
    return dtypes != {torch.float16} and dtypes != {torch.bfloat16} or (
        dtypes == {torch.bfloat16} and interpreter_mode())


@functools.lru_cache(None)
def device_arch(device: torch.device) -> int:
    """The configuration family of a device: 90 for Hopper and newer, 80 otherwise (and for the interpreter)."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9:
        return 90
    return 80

"""feature_regression_loss cases shared by the CPU tests, the Triton-interpreter tests and the GPU tests."""
from __future__ import annotations

import functools

import torch

import gdrd_fast
from gdrd_fast import reference
from loss_checks import check_loss_and_grads

# (B, Cs, Ct, spatial): odd channel counts, NCHW maps and [N, C] features (spatial = None)
SIZES = [(1, 3, 5, None), (5, 37, 29, (3, 5)), (2, 70, 130, (7, 3)), (47, 100, 31, None)]
# the dtypes every fast path is checked in (float64 is the reference's)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check_feature_regression(backend: str, b: int, cs: int, ct: int, spatial, dtype: torch.dtype, device: str,
                             with_bias: bool = True) -> None:
    shape = tuple(spatial or ())
    inputs = {"student": torch.randn(b, cs, *shape, device=device).to(dtype),
              "teacher": torch.randn(b, ct, *shape, device=device).to(dtype),
              "weight": (torch.randn(ct, cs, device=device) / cs ** 0.5).to(dtype)}
    if with_bias:
        inputs["bias"] = torch.randn(ct, device=device).to(dtype)
    fast = functools.partial(gdrd_fast.feature_regression_loss, reduction="none", backend=backend)
    ref = functools.partial(reference.feature_regression_loss, reduction="none")
    grads = ("student", "weight") + (("bias",) if with_bias else ())
    check_loss_and_grads(fast, ref, inputs, grads, dtype)

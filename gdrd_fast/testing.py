"""Tolerance rules for checking a fast backend against the float64 reference (docs/design/testing.md).

A fast result passes when its error against float64 is at most the error of the reference run in the
input's own dtype, plus a per-dtype tolerance: "no worse than PyTorch's own rounding, plus tol".
"""
from __future__ import annotations

import torch
from torch import Tensor

TOLERANCES = {torch.float64: 1e-9, torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def max_error(x: Tensor, ref: Tensor) -> float:
    """Largest absolute error, relative to the reference's scale (max |ref|, at least 1)."""
    x, ref = x.detach().double(), ref.detach().double()
    if x.shape != ref.shape:
        raise AssertionError(f"shape {tuple(x.shape)} != reference shape {tuple(ref.shape)}")
    if not torch.isfinite(x).all():
        raise AssertionError("result has NaN/Inf")
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return float((x - ref).abs().max()) / scale if x.numel() else 0.0


def assert_close(name: str, fast: Tensor, ref64: Tensor, same_dtype_ref: Tensor | None, dtype: torch.dtype) -> None:
    """fast vs the float64 reference, allowed the same-dtype reference's own error plus TOLERANCES[dtype]."""
    baseline = max_error(same_dtype_ref, ref64) if same_dtype_ref is not None else 0.0
    err = max_error(fast, ref64)
    limit = baseline + TOLERANCES[dtype]
    if not err <= limit:
        raise AssertionError(f"{name}: error {err:.3g} vs float64 exceeds {limit:.3g} "
                             f"(same-dtype torch error {baseline:.3g} + tol {TOLERANCES[dtype]:g}, {dtype})")

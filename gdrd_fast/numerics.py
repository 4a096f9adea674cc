"""Numerics helpers shared by the reference and the fast paths: accumulation dtype, reduction, pairs."""
from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(t: Tensor) -> torch.dtype:
    """The accumulation dtype of an input: float64 stays float64 (exact), everything else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype, without a call where it already is: a no-op Tensor.to still costs a small call's host
    about a microsecond, and the relational paths cast some thirty tensors a step."""
    return t if t.dtype == dtype else t.to(dtype)


def reduce_rows(rows: Tensor, reduction: str, out_dtype: torch.dtype, row_size: int = 1) -> Tensor:
    """The one reduction of every loss, from per-row losses in the accumulation dtype.

    'none' returns the rows in the input dtype; 'mean' their mean and 'sum' their sum times row_size
    (a row that is itself a mean over row_size elements, as in feature regression, sums back to the
    total), as float32 (float64 for float64 inputs) scalars.
    """
    if reduction == "none":
        return rows.to(out_dtype)
    if reduction == "mean":  # one op and one backward node: a small call's host time is counted in ops
        return rows.mean()
    total = rows.sum()
    return total * row_size if row_size != 1 else total


def reduce_pairs(rows: Tensor, pairs: Tensor | int, reduction: str, out_dtype: torch.dtype) -> Tensor:
    """reduce_rows, except that 'mean' divides by the number of (query, positive) pairs (0 without pairs)."""
    if reduction == "mean":
        return rows.sum() / (pairs.clamp_min(1) if isinstance(pairs, Tensor) else max(pairs, 1))
    return reduce_rows(rows, reduction, out_dtype)


def pair_indices(batch: int, device=None) -> tuple[Tensor, Tensor]:
    """Rows r = (i, j), i != j, i-major: r = i * (B - 1) + (j if j < i else j - 1)."""
    i = torch.arange(batch, device=device).repeat_interleave(max(batch - 1, 0))
    j = torch.arange(batch, device=device).repeat(batch, 1)
    j = j[~torch.eye(batch, dtype=torch.bool, device=device)]
    return i, j


def off_diagonal(grid: Tensor) -> Tensor:
    """grid [B, B, ...] -> its entries (i, j), i != j, as rows [B(B-1), ...] in pair_indices order.

    Only reshapes and slices: the backward scatters nothing (no atomic adds), so it is deterministic on
    every device, unlike the backward of x[j].
    """
    b, rest = grid.shape[0], grid.shape[2:]
    return grid.reshape(b * b, *rest)[1:].reshape(b - 1, b + 1, *rest)[:, :-1].reshape(b * (b - 1), *rest)

"""One check for every fast path of a loss: the loss AND every gradient against the float64 reference,
with a random per-row grad_output (never all ones), plus a no-grad forward (docs/design/testing.md).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from gdrd_fast.testing import assert_close


def check_loss_and_grads(fast: Callable[..., Tensor], reference: Callable[..., Tensor],
                         inputs: dict[str, Tensor], grad_names: tuple[str, ...], dtype: torch.dtype) -> None:
    """fast(**inputs) and reference(**inputs) return per-row losses [B] ('none' reduction)."""

    def run(fn, cast):
        leaves = {k: cast(v).detach().requires_grad_(k in grad_names) for k, v in inputs.items()}
        rows = fn(**leaves)
        (rows.double() * grad_rows).sum().backward()
        return rows, {k: leaves[k].grad for k in grad_names}

    first = next(iter(inputs.values()))
    # grad_output != 1 and different per row
    grad_rows = torch.rand(first.shape[0], dtype=torch.float64, device=first.device) * 2 + 0.5
    ref64_rows, ref64_grads = run(reference, lambda t: t.double())
    same_rows, same_grads = run(reference, lambda t: t)
    fast_rows, fast_grads = run(fast, lambda t: t)
    assert fast_rows.dtype == dtype, f"'none' must return the input dtype {dtype}, got {fast_rows.dtype}"
    assert_close("loss", fast_rows, ref64_rows, same_rows, dtype)
    for name in grad_names:
        assert fast_grads[name] is not None, f"no gradient reached {name}"
        assert fast_grads[name].dtype == inputs[name].dtype, f"grad of {name} has dtype {fast_grads[name].dtype}"
        assert_close(f"grad {name}", fast_grads[name], ref64_grads[name], same_grads[name], dtype)

    with torch.no_grad():
        rows = fast(**inputs)
    assert not rows.requires_grad
    assert_close("no-grad loss", rows, ref64_rows, same_rows, dtype)

"""feature_regression_loss: fast backends (ops.md section 4).

Contract used by gdrd_fast.functional:
- IMPLS: backend name -> Impl (see gdrd_fast.backends).
- feature_regression_rows(student, teacher, weight [Ct, Cs], bias or None, backend) -> per-sample mean
  squared error [B] in the accumulation dtype, with autograd to student, weight and bias.
"""
from __future__ import annotations

from .. import backends

IMPLS: dict[str, backends.Impl] = {}

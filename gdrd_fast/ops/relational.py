"""relational_contrastive_loss (CRRCD): fast backends (ops.md section 3).

Contract used by gdrd_fast.functional:
- IMPLS: backend name -> Impl (see gdrd_fast.backends).
- relational_rows(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, log_z_t, log_z_s, n_data,
  backend) -> (rows_student [R], rows_teacher [R]) in the accumulation dtype, with autograd to e_s and
  params.
- relational_log_z(e_t, e_s, queue_t, queue_s, neg_idx, params, temperature, n_data, backend)
  -> (log_z_t, log_z_s).
"""
from __future__ import annotations

from .. import backends

IMPLS: dict[str, backends.Impl] = {}

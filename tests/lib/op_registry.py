"""Every op of gdrd_fast, once: the tests iterate this table instead of keeping their own lists.

An entry names the op's backend table (gdrd_fast.backends.op(name)), the size names its functional entry
passes to resolve(), and `run(backend, dtype, device, **sizes)`, which calls the functional entry on
small inputs of those sizes. A new op adds one entry here (docs/design/adding-an-op.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

import gdrd_fast.functional as F
from gdrd_fast import backends
from gdrd_fast.params import RelationalParams, relational_param_shapes


@dataclass(frozen=True)
class OpEntry:
    name: str                         # the Op's name, which is also the functional entry's
    run: Callable[..., object]        # run(backend, dtype, device, **sizes)
    sizes: dict[str, int]             # the size names resolve() gets, with a default value
    triton_kernel: str | None = None  # the kernels/ module of its Triton backend

    @property
    def table(self) -> backends.Op:
        return backends.op(self.name)


def _randn(*shape, dtype, device):
    return torch.randn(*shape, dtype=dtype, device=device)


def _infonce(backend, dtype, device, d=8, **options):
    q = _randn(4, d, dtype=dtype, device=device).requires_grad_()
    return F.infonce_bank_loss(q, _randn(4, d, dtype=dtype, device=device), _randn(16, d, dtype=dtype, device=device),
                               backend=backend, **options)


def _crd(backend, dtype, device, d=8):
    anchor = _randn(4, d, dtype=dtype, device=device).requires_grad_()
    idx = torch.randint(30, (4, 6), device=device)
    return F.crd_nce_loss(anchor, _randn(30, d, dtype=dtype, device=device), idx, log_z=1.0, backend=backend)


def _crd_pair(backend, dtype, device, d=8):
    a, b = (_randn(4, d, dtype=dtype, device=device).requires_grad_() for _ in range(2))
    memory_a, memory_b = (_randn(30, d, dtype=dtype, device=device) for _ in range(2))
    idx = torch.randint(30, (4, 6), device=device)
    return F.crd_nce_pair_loss(a, memory_a, 1.0, b, memory_b, 2.0, idx, backend=backend)


def _crd_log_z(backend, dtype, device, d=8):
    return F.crd_log_z(_randn(4, d, dtype=dtype, device=device), _randn(30, d, dtype=dtype, device=device),
                       torch.randint(30, (4, 6), device=device), backend=backend)


def _relational_inputs(dtype, device, relation_dim, embed=6, batch=3, queue=10, negatives=4):
    param_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    params = RelationalParams(**{k: (0.3 * _randn(*shape, dtype=param_dtype, device=device)).requires_grad_()
                                 for k, shape in relational_param_shapes(embed, relation_dim).items()})
    e_t, e_s, queue_t, queue_s = (torch.nn.functional.normalize(_randn(n, embed, dtype=dtype, device=device), dim=1)
                                  for n in (batch, batch, queue, queue))
    return (e_t, e_s.requires_grad_(), queue_t, queue_s, torch.randint(queue, (batch, negatives), device=device),
            params)


def _relational(backend, dtype, device, relation_dim=8):
    return F.relational_contrastive_loss(*_relational_inputs(dtype, device, relation_dim), log_z_t=1.0,
                                         log_z_s=1.0, n_data=50, backend=backend)


def _relational_log_z(backend, dtype, device, relation_dim=8):
    return F.relational_log_z(*_relational_inputs(dtype, device, relation_dim), n_data=50, backend=backend)


def _feature_regression(backend, dtype, device):
    student = _randn(4, 5, 2, 2, dtype=dtype, device=device).requires_grad_()
    return F.feature_regression_loss(student, _randn(4, 3, 2, 2, dtype=dtype, device=device),
                                     _randn(3, 5, dtype=dtype, device=device), backend=backend)


def _bank_update(backend, dtype, device):
    memory = _randn(10, 4, dtype=dtype, device=device)
    F.bank_update_(memory, torch.tensor([1, 3], device=device), _randn(2, 4, dtype=dtype, device=device), 0.5,
                   backend=backend)
    return memory


def _bank_update_pair(backend, dtype, device):
    memory_a, memory_b = _randn(10, 4, dtype=dtype, device=device), _randn(10, 4, dtype=dtype, device=device)
    values = _randn(2, 4, dtype=dtype, device=device)
    F.bank_update_pair_(memory_a, values, memory_b, values, torch.tensor([1, 3], device=device), 0.5, backend=backend)
    return memory_a, memory_b


def _queue_push(backend, dtype, device):
    queue = torch.zeros(8, 4, dtype=dtype, device=device)
    ptr, count = torch.zeros((), dtype=torch.long, device=device), torch.zeros((), dtype=torch.long, device=device)
    F.queue_push_(queue, ptr, count, _randn(3, 4, dtype=dtype, device=device), backend=backend)
    return queue, ptr, count


def _queue_sample(backend, dtype, device):
    return F.queue_sample_negatives(None, 5, torch.zeros(3, dtype=torch.long, device=device),
                                    torch.tensor([7], device=device), 4, backend=backend)


def _launch_feature_regression(module, dtype):
    for teacher_dtype in {dtype, torch.float32}:
        for bias in (torch.randn(7), None):
            x, teacher, weight = torch.randn(3, 5, 4).to(dtype), torch.randn(3, 7, 4).to(teacher_dtype), torch.randn(7, 5)
            module.feature_regression_forward(x, teacher, weight, bias)
            module.feature_regression_backward(torch.rand(3), x, teacher, weight, bias)


def _launch_infonce(module, dtype):
    for d in (20, 33, 64, 100, 256, 500):
        q, bank = torch.randn(5, d).to(dtype), torch.randn(50, d).to(dtype)
        if module.supports(d, dtype, dtype):
            for need_grad, need_rank in ((True, False), (False, False), (True, True)):
                module.infonce_bank_forward(q, q, bank, 0.1, need_grad, need_rank)


def _launch_relational(module, dtype):
    for dim in (9, 17, 31, 64, 128):
        if not module.supports(dim, torch.float32, dtype):
            continue
        b, k = 4, 300
        args = (torch.randn(b, dim), torch.randn(20, dim), torch.randint(20, (b, k)), torch.randn(dim, dim).to(dtype),
                torch.randn(dim), torch.randn(b * (b - 1), dim), torch.tensor(0.5), 0.1)
        for need_grad, log_sum_exp in ((True, False), (False, False), (False, True)):
            module.relational_negatives(*args, need_grad, log_sum_exp)


# kernels/ module -> launch(module, dtype): every launch its launcher can make for inputs of that dtype, on
# CPU tensors (tests/lib/test_triton_static.py records them instead of running them)
TRITON_LAUNCHES = {"feature_regression": _launch_feature_regression, "infonce": _launch_infonce,
                   "relational": _launch_relational}

OPS = [
    OpEntry("infonce_bank_loss", _infonce, {"d": 8}, "infonce"),
    OpEntry("infonce_bank_pairs_loss", lambda *a, d=8: _infonce(*a, d=d, normalize=True), {"d": 8}, "infonce"),
    OpEntry("crd_nce_loss", _crd, {"d": 8}),
    OpEntry("crd_nce_pair_loss", _crd_pair, {"d": 8}),
    OpEntry("crd_log_z", _crd_log_z, {}),
    OpEntry("relational_contrastive_loss", _relational, {"relation_dim": 8}, "relational"),
    OpEntry("relational_log_z", _relational_log_z, {"relation_dim": 8}, "relational"),
    OpEntry("feature_regression_loss", _feature_regression, {}, "feature_regression"),
    OpEntry("bank_update_", _bank_update, {}),
    OpEntry("bank_update_pair_", _bank_update_pair, {}),
    OpEntry("queue_push_", _queue_push, {}),
    OpEntry("queue_sample_negatives", _queue_sample, {}),
]
BY_NAME = {entry.name: entry for entry in OPS}


def triton_or_auto(op_name: str, dtype: torch.dtype, device: str = "cpu", **sizes: int) -> str:
    """'triton' where its declared dtypes and sizes take the call; else 'auto', which runs the op's exact
    path (named explicitly, 'triton' would refuse such a call: tests/lib/test_dispatch.py)."""
    reasons = backends.op(op_name)["triton"].not_supported_reasons(torch.device(device), dtype, **sizes)
    return "auto" if reasons else "triton"

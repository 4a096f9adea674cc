"""crd_nce_loss cases shared by the compiled-kernel tests on CPU and the GPU tests: sizes, dtypes, inputs and
the check of loss and anchor gradient (grad_output != 1) and the no-grad forward against float64."""
import math

import torch

from gdrd_fast import functional, reference
from gdrd_fast.testing import assert_close

# (B, K, D, N): N large keeps the gathered kernel; the last case takes the dense path on every device
SIZES = [(1, 1, 31, 50), (47, 123, 100, 5000), (5, 1000, 128, 20000), (3, 300, 31, 97)]
DTYPES = [  # (anchor dtype, bank dtype)
    (torch.float64, torch.float64), (torch.float32, torch.float32), (torch.float16, torch.float32),
    (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


def crd_inputs(b, k, d, n, anchor_dtype, bank_dtype, idx_dtype, device):
    anchor = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    memory = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    idx = torch.randint(n, (b, k + 1), dtype=idx_dtype)
    log_z = torch.tensor(math.log(n) + torch.rand(()).item(), dtype=torch.float64)
    return (anchor.to(device, anchor_dtype), memory.to(device, bank_dtype), idx.to(device), log_z.to(device))


def loss_and_grad(fn, anchor, weights):
    anchor = anchor.detach().requires_grad_(True)
    rows = fn(anchor)
    (grad,) = torch.autograd.grad((rows.double() * weights).sum(), anchor)
    return rows, grad


def check_crd(backend, size, dtypes, idx_dtype, device):
    anchor, memory, idx, log_z = crd_inputs(*size, *dtypes, idx_dtype, device)
    kw = dict(temperature=0.07, log_z=log_z, n_data=memory.shape[0] + 3, reduction="none")
    weights = torch.rand(size[0], dtype=torch.float64, device=device) + 0.5  # grad_output != 1
    fast, g_fast = loss_and_grad(lambda a: functional.crd_nce_loss(a, memory, idx, backend=backend, **kw),
                                 anchor, weights)
    ref, g_ref = loss_and_grad(lambda a: reference.crd_nce_loss(a.double(), memory.double(), idx, **kw), anchor,
                               weights)
    same, g_same = loss_and_grad(lambda a: reference.crd_nce_loss(a, memory, idx, **kw), anchor, weights)
    assert fast.dtype == anchor.dtype and g_fast.dtype == anchor.dtype
    assert_close("loss", fast, ref, same, dtypes[0])
    assert_close("d anchor", g_fast, g_ref, g_same, dtypes[0])
    with torch.no_grad():
        nograd = functional.crd_nce_loss(anchor, memory, idx, backend=backend, **kw)
    assert_close("no-grad loss", nograd, ref, same, dtypes[0])

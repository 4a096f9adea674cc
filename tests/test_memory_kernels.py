"""Compiled bank updates (csrc/cpu/bank_update.cpp; csrc/cuda/bank_update.cu on a GPU) against the
float64 reference: momentum, renormalisation, last duplicate wins, two banks in one call."""
import pytest
import torch

from gdrd_fast import MemoryBank, backends, reference, validation
from gdrd_fast.ops import memory as memory_ops

pytestmark = pytest.mark.skipif(backends.cpu_extension() is None, reason="needs the C++ extension gdrd_fast._C")
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def case(n, d, b, bank_dtype, idx_dtype, device, duplicates=True):
    bank = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    idx = torch.randint(n, (b,)) if duplicates else torch.randperm(n)[:b]
    values = torch.randn(b, d, dtype=torch.float64)
    return bank.to(device, bank_dtype), idx.to(device, idx_dtype), values.to(device, torch.float32)


def expected(bank, idx, values, momentum):
    return reference.bank_update_(bank.double().clone(), idx, values.double(), momentum)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n, d, b", [(7, 31, 20), (1000, 128, 65), (3, 5, 1)])
def test_bank_update_matches_reference(device, bank_dtype, idx_dtype, n, d, b):
    bank, idx, values = case(n, d, b, bank_dtype, idx_dtype, device)
    want = expected(bank, idx, values, 0.3)
    memory_ops.bank_update_(bank, idx, values, 0.3, backend=device)
    # rows the update does not touch are left bit for bit
    untouched = torch.ones(n, dtype=torch.bool, device=device).index_fill_(0, idx.long(), False)
    assert torch.equal(bank[untouched].double(), want[untouched])
    torch.testing.assert_close(bank.double(), want, rtol=0, atol=TOL[bank_dtype])


@pytest.mark.parametrize("device", DEVICES)
def test_last_duplicate_wins_deterministically(device):
    bank, _, values = case(10, 16, 40, torch.float32, torch.int64, device)
    idx = torch.full((40,), 4, device=device)
    idx[::3] = 7
    want = expected(bank, idx, values, 0.5)
    for _ in range(3):
        got = bank.clone()
        memory_ops.bank_update_(got, idx, values, 0.5, backend=device)
        assert torch.equal(got[4].double(), want[4].float().double())  # written from values[39] only
        torch.testing.assert_close(got.double(), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_pair_update_equals_two_single_updates(device, bank_dtype):
    bank_a, idx, values_a = case(500, 100, 47, bank_dtype, torch.int64, device)
    bank_b, _, values_b = case(500, 100, 47, bank_dtype, torch.int64, device)
    single_a, single_b = bank_a.clone(), bank_b.clone()
    memory_ops.bank_update_(single_a, idx, values_a, 0.5, backend=device)
    memory_ops.bank_update_(single_b, idx, values_b, 0.5, backend=device)
    memory_ops.bank_update_pair_(bank_a, values_a, bank_b, values_b, idx, 0.5, backend=device)
    assert torch.equal(bank_a, single_a) and torch.equal(bank_b, single_b)


@pytest.mark.parametrize("device", DEVICES)
def test_memory_bank_module_uses_kernel_and_rejects_bad_input(device, monkeypatch):
    monkeypatch.setattr(validation, "_checks_on_gpu", True)  # value checks sync, so GPU runs them on request
    bank = MemoryBank(30, 8, momentum=0.5, backend=device).to(device)
    before = bank.rows.clone()
    with pytest.raises(ValueError, match="idx"):
        bank.update_(torch.tensor([1, 30], device=device), torch.randn(2, 8, device=device))
    with pytest.raises(ValueError, match="values"):
        bank.update_(torch.tensor([1, 2], device=device), torch.full((2, 8), float("nan"), device=device))
    assert torch.equal(bank.rows, before)
    idx, values = torch.tensor([5, 2, 5], device=device), torch.randn(3, 8, device=device)
    want = expected(before, idx, values, 0.5)
    bank.update_(idx, values)
    torch.testing.assert_close(bank.rows.double(), want, rtol=0, atol=1e-6)

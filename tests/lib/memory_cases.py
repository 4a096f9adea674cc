"""MemoryBank and MemoryQueue cases shared by the compiled-kernel tests on CPU and the GPU tests: bank-update
inputs and their float64 expectation, tolerances per bank dtype, and empty queue state."""
import torch

from gdrd_fast import reference

# a bank update's error after one normalisation, per bank dtype
TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def bank_case(n, d, b, bank_dtype, idx_dtype, device, duplicates=True):
    bank = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=1)
    idx = torch.randint(n, (b,)) if duplicates else torch.randperm(n)[:b]
    values = torch.randn(b, d, dtype=torch.float64)
    return bank.to(device, bank_dtype), idx.to(device, idx_dtype), values.to(device, torch.float32)


def expected_bank(bank, idx, values, momentum):
    return reference.bank_update_(bank.double().clone(), idx, values.double(), momentum)


def empty_queue(size, d, dtype, device, with_labels):
    labels = torch.full((size,), -1, device=device) if with_labels else None
    return [torch.zeros(size, d, dtype=dtype, device=device), torch.tensor(0, device=device),
            torch.tensor(0, device=device), labels]

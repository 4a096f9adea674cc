"""The Triton relational kernel (kernels/relational.py) under TRITON_INTERPRET=1 on CPU tensors, against float64."""
import pytest
import torch

from relational_cases import (INTERPRETER_CASES, check_backend, check_bf16_large_inputs, check_log_z,
                              check_nan_poisons_the_loss, check_opcheck, size_id)
from op_registry import triton_or_auto

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype,sizes", INTERPRETER_CASES, ids=[size_id(*c) for c in INTERPRETER_CASES])
def test_triton_relational_matches_float64(dtype, sizes):
    check_backend(triton_or_auto("relational_contrastive_loss", dtype), dtype, sizes)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_relational_reductions(reduction):
    check_backend("triton", torch.float32, (3, 20, 16, 10, 9), reduction)


def test_triton_relational_log_z():
    check_log_z("triton", (torch.float32, torch.float16), (5, 48, 20, 40, 77))


def test_triton_nan_in_a_queue_row_poisons_the_loss():
    check_nan_poisons_the_loss("triton")


def test_triton_negatives_op_passes_opcheck():
    check_opcheck("triton")


def test_triton_bf16_inputs_of_magnitude_1e5():
    check_bf16_large_inputs("triton")

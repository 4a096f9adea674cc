"""infonce_bank_loss's in-batch / normalize / label options on the Triton backend (interpreted, CPU
tensors): the bank still goes through the Triton kernel, merged with the dense B x B block."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before gdrd_fast.kernels loads (see interp_infonce.py)

import pytest

from infonce_cases import check_infonce_pairs

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("b,k,d", [(1, 37, 31), (5, 0, 31), (7, 1, 100), (13, 123, 64)])
@pytest.mark.parametrize("labelled", [False, True])
def test_triton_pairs_match_float64(b, k, d, labelled):
    check_infonce_pairs("triton", b, k, d, labelled, "cpu", temperature=0.1, classes=3)

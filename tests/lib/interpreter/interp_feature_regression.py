"""The Triton feature_regression kernels under TRITON_INTERPRET=1 on CPU tensors, against float64."""
import os

# Triton decides at import whether kernels are interpreted: set before gdrd_fast.kernels loads. These
# files are run by tests/lib/test_triton_interpreter.py in their own process (the name keeps `pytest tests`
# from collecting them into a session that compiles kernels for the static checks).
os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch

from feature_regression_cases import DTYPES, SIZES, check_feature_regression

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,cs,ct,spatial", SIZES)
def test_triton_feature_regression_matches_float64(b, cs, ct, spatial, dtype):
    check_feature_regression("triton", b, cs, ct, spatial, dtype, "cpu")


def test_triton_feature_regression_without_bias():
    check_feature_regression("triton", 3, 20, 9, (4, 4), torch.float32, "cpu", with_bias=False)

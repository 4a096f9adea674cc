"""feature_regression_loss fwd+bwd (grads for student, weight, bias): eager reference,
torch.compile(reference) and gdrd_fast backends."""
from __future__ import annotations

import pytest
import torch

import gdrd_fast
from gdrd_fast import reference
from gdrd_fast.ops import feature_regression as fr_ops
from .harness import cases, measure, skip_unavailable

OP = "feature_regression_loss"
# (B, Cs, Ct, H=W): docs/performance/index.md targets Cs <= 128 and Cs >= 512
SIZES = {
    "cpu": {"B32-Cs128-Ct128-8x8": (32, 128, 128, 8), "B16-Cs512-Ct512-4x4": (16, 512, 512, 4)},
    "cuda": {f"B{b}-Cs{cs}-Ct{ct}-{hw}x{hw}": (b, cs, ct, hw) for b, cs, ct, hw in
             [(256, 128, 128, 16), (256, 64, 128, 16), (256, 512, 512, 8), (64, 512, 512, 16)]},
}
PROVIDERS = ["eager", "compile", "cpu", "triton"]


def flops(size_key: str, device: str) -> int:
    """Forward 2 N Cs Ct plus gradients for input and weight: 6 N Cs Ct (docs/performance/index.md)."""
    b, cs, ct, hw = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    return 6 * b * hw * hw * cs * ct


def build(provider: str, size_key: str, device: str):
    b, cs, ct, hw = SIZES["cuda" if device.startswith("cuda") else "cpu"][size_key]
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    student = torch.randn(b, cs, hw, hw, device=device, generator=gen).to(dtype).requires_grad_(True)
    teacher = torch.randn(b, ct, hw, hw, device=device, generator=gen).to(dtype)
    weight = (torch.randn(ct, cs, device=device, generator=gen) / cs ** 0.5).requires_grad_(True)
    bias = torch.zeros(ct, device=device, requires_grad=True)
    if provider == "eager":
        loss_fn = reference.feature_regression_loss
    elif provider == "compile":
        loss_fn = torch.compile(reference.feature_regression_loss)
    else:
        loss_fn = lambda *args: gdrd_fast.feature_regression_loss(*args, backend=provider)

    def step():
        student.grad = weight.grad = bias.grad = None
        loss_fn(student, teacher, weight, bias).backward()

    return step


@pytest.mark.parametrize("provider,size_key,device", cases(SIZES, PROVIDERS))
def test_feature_regression_loss(benchmark, provider, size_key, device):
    skip_unavailable(fr_ops.IMPLS, provider, device)
    measure(benchmark, __name__, OP, provider, size_key, device, rounds=20 if device == "cpu" else 50,
            flop=flops(size_key, device))
